"""benchmarks/tune_fused_moe.py: the candidate space is valid and the script refuses to run without CUDA."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "tune_fused_moe.py"
SMEM = 227 * 1024  # H100/H200 opt-in shared memory per block


@pytest.fixture(scope="module")
def tune():
    spec = importlib.util.spec_from_file_location("tune_fused_moe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _configs(tune, monkeypatch, num_tokens, shape=(1024, 4096, 192, 1), quick=True):
    monkeypatch.setattr(tune, "shared_memory_limit", lambda: SMEM)
    H, F, E, k = shape
    configs = list(tune.candidates(num_tokens, E, H, F, k, 2, quick, 132))
    assert configs and len(set(configs)) == len(configs)
    for c in configs:
        assert (c.BLOCK_M * c.BLOCK_K + 2 * c.BLOCK_K * c.BLOCK_N) * 2 * c.num_stages <= SMEM
        assert c.SPLIT_K == 1 or F >= c.SPLIT_K * 2 * c.BLOCK_K
    return configs


def test_token_counts_cover_decode_to_prefill(tune):
    assert tune.TOKENS == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


@pytest.mark.parametrize("num_tokens", [1, 2, 4, 8])
def test_small_t_space_has_split_k_and_narrow_tiles(tune, monkeypatch, num_tokens):
    configs = _configs(tune, monkeypatch, num_tokens)
    assert {c.SPLIT_K for c in configs} == {1, 2, 4, 8, 16}
    assert min(c.BLOCK_N for c in configs) == 32 and {c.BLOCK_M for c in configs} == {16}


@pytest.mark.parametrize("num_tokens,expect_max_m", [(64, 32), (4096, 64), (16384, 128)])
def test_large_t_space_follows_rows_per_expert(tune, monkeypatch, num_tokens, expect_max_m):
    configs = _configs(tune, monkeypatch, num_tokens)
    assert max(c.BLOCK_M for c in configs) == expect_max_m and {c.SPLIT_K for c in configs} == {1}


def test_short_experts_limit_the_split(tune, monkeypatch):
    # F = 768: a K range of two BLOCK_K steps caps SPLIT_K (768 / (2 * 128) -> 2 with BLOCK_K 128).
    configs = _configs(tune, monkeypatch, 1, shape=(768, 768, 384, 4), quick=False)
    assert max(c.SPLIT_K for c in configs if c.BLOCK_K == 128) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_exits_cleanly_without_cuda(tune, capsys):
    assert tune.main(["--quick"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
