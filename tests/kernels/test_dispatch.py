"""The package imports without triton; the dispatcher sends CPU tensors to the references."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from kernel_checks import HAS_CUDA

from unipool_serve import kernels
from unipool_serve.kernels import dispatch


def test_package_import_does_not_import_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import sys, unipool_serve.kernels as k; k.pool_moe; k.route_with_table; print('triton' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_lazy_exports():
    from unipool_serve.kernels.fused_moe import fused_pool_moe
    from unipool_serve.kernels.routing import fused_route

    assert kernels.fused_route is fused_route and kernels.fused_pool_moe is fused_pool_moe
    with pytest.raises(AttributeError):
        kernels.no_such_kernel  # noqa: B018


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU path")
def test_cpu_tensors_take_the_references():
    logits = torch.randn(5, 8)
    steer = torch.zeros(5, dtype=torch.int32)
    bias, mask = torch.zeros(1, 2, 8), torch.zeros(1, 2, 8, dtype=torch.int8)
    got = kernels.dispatch_route_with_table(logits, steer, bias, mask, 1, 2, "softmax", renormalize=True)
    want = kernels.route_with_table(logits, steer, bias, mask, 1, 2, "softmax", renormalize=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    hidden, w_gu, w_d = torch.randn(5, 16), torch.randn(8, 24, 16), torch.randn(8, 16, 12)
    assert torch.equal(kernels.dispatch_pool_moe(hidden, w_gu, w_d, got[0], got[1]),
                       kernels.pool_moe(hidden, w_gu, w_d, got[0], got[1]))


def test_bad_kernel_choice_is_named(monkeypatch):
    monkeypatch.setenv(dispatch.KERNELS_ENV, "cutlass")
    with pytest.raises(ValueError, match="UNIPOOL_KERNELS"):
        dispatch.use_triton(torch.device("cuda"))
    monkeypatch.setenv(dispatch.KERNELS_ENV, "torch")
    assert not dispatch.use_triton(torch.device("cuda"))
