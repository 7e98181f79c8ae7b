"""benchmarks/tune_fused_moe.py: the candidate space is valid and the script refuses to run without CUDA."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "tune_fused_moe.py"


@pytest.fixture(scope="module")
def tune():
    spec = importlib.util.spec_from_file_location("tune_fused_moe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("num_tokens,expect_max_m", [(1, 32), (64, 32), (16384, 128)])
def test_candidates_fit_shared_memory_and_follow_rows_per_expert(tune, monkeypatch, num_tokens, expect_max_m):
    monkeypatch.setattr(tune, "shared_memory_limit", lambda: 227 * 1024)
    configs = list(tune.candidates(num_tokens, 192, 1, 2, quick=True))
    assert configs and len(set(configs)) == len(configs)
    assert max(c.BLOCK_M for c in configs) == expect_max_m
    for c in configs:
        assert (c.BLOCK_M * c.BLOCK_K + 2 * c.BLOCK_K * c.BLOCK_N) * 2 * c.num_stages <= 227 * 1024


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_exits_cleanly_without_cuda(tune, capsys):
    assert tune.main(["--quick"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
