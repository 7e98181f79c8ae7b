"""Shared pieces of the kernel tests: device, dtypes, tolerances, random inputs, comparisons."""

from __future__ import annotations

import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="bf16 runs on CUDA only (the interpreter has no bf16)")

# fp32 is exact up to summation order; fp16/bf16 round inputs, the intermediate and the output.
TOLERANCES = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=[needs_cuda, pytest.mark.gpu])]


def kernels_runnable_here() -> bool:
    """True when Triton kernels can run in this process: CUDA, or an interpreter set up in time."""
    if HAS_CUDA:
        return True
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    kernels = [tl.sum]  # decorated at `import triton`
    for module, name in (("unipool_serve.kernels.routing", "_route_kernel"),
                         ("unipool_serve.kernels.fused_moe", "_expert_gemm_kernel"),
                         ("unipool_serve.kernels.fused_align", "_align_kernel"),
                         ("unipool_serve.kernels.moe_combine", "_combine_kernel")):
        if module in sys.modules:  # decorated when first imported
            kernels.append(getattr(sys.modules[module], name))
    return all(isinstance(k, InterpretedFunction) for k in kernels)


def steering_tables(num_profiles: int, num_layers: int, num_experts: int, gen: torch.Generator):
    """bias_table [P+1, L, E] fp32 and mask_table [P+1, L, E] int8 with row 0 all zeros.

    Profile 1 biases only, profile 2 includes, profile 3 excludes, further ones mix
    bias, includes and excludes, so one batch carries every kind of steering.
    """
    shape = (num_profiles + 1, num_layers, num_experts)
    bias = torch.zeros(shape)
    mask = torch.zeros(shape, dtype=torch.int8)
    for p in range(1, num_profiles + 1):
        kind = (p - 1) % 4
        if kind in (0, 3):
            bias[p] = 2.0 * torch.randn(num_layers, num_experts, generator=gen)
        pick = torch.rand(num_layers, num_experts, generator=gen)
        if kind in (1, 3):
            mask[p][pick < 0.15] = 1
        if kind in (2, 3):
            mask[p][pick > 0.6] = -1
    return bias.to(DEVICE), mask.to(DEVICE)


def moe_pools(num_experts: int, hidden: int, ffn: int, dtype: torch.dtype, gen: torch.Generator):
    """w_gate_up [E, 2F, H], w_down [E, H, F], scaled so activations stay O(1) (tolerances mean something)."""
    w_gate_up = torch.randn(num_experts, 2 * ffn, hidden, generator=gen) / hidden**0.5
    w_down = torch.randn(num_experts, hidden, ffn, generator=gen) / ffn**0.5
    return w_gate_up.to(dtype).to(DEVICE), w_down.to(dtype).to(DEVICE)


def distinct_choices(num_tokens: int, num_experts: int, top_k: int, gen: torch.Generator) -> torch.Tensor:
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    return scores.topk(top_k, dim=-1).indices.to(torch.int32)  # [T, k], distinct per token


def run_and_compare(hidden, w_gate_up, w_down, ids, weights, config) -> torch.Tensor:
    """fused_pool_moe into a NaN-poisoned `out` (every row must be written) vs pool_moe on CPU."""
    from unipool_serve.kernels.fused_moe import fused_pool_moe
    from unipool_serve.kernels.moe_reference import pool_moe

    out = torch.full_like(hidden, float("nan"))
    got = fused_pool_moe(hidden, w_gate_up, w_down, ids, weights, config, out=out)
    assert got.data_ptr() == out.data_ptr()
    want = pool_moe(hidden.cpu(), w_gate_up.cpu(), w_down.cpu(), ids.cpu(), weights.cpu())
    tol = TOLERANCES[hidden.dtype]
    torch.testing.assert_close(got.cpu().float(), want.float(), atol=tol, rtol=tol)
    return got
