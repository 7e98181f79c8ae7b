"""fused_pool_moe == moe_reference.pool_moe over shapes, dtypes, routings and launch configs."""

from __future__ import annotations

import zlib

import pytest
import torch
from kernel_checks import DEVICE, DTYPES, distinct_choices, moe_pools, run_and_compare

from unipool_serve.kernels.fused_moe import fused_pool_moe
from unipool_serve.kernels.launch_config import MoELaunchConfig

# H and F are deliberately not multiples of any block size (tails in N and K).
H, F = 40, 72
SMALL_TILES = MoELaunchConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=2)
WIDE_TILES = MoELaunchConfig(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=2)
TALL_TILES = MoELaunchConfig(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2)
# (T, E, k, config): every T in {1, 7, 64, 300}, E in {1, 8, 96}, k in {1, 2, 4}. The
# interpreter's cost grows with the number of programs, so the large cases get wide tiles.
CASES = [
    (1, 1, 1, SMALL_TILES),
    (7, 8, 2, SMALL_TILES),
    (64, 8, 4, TALL_TILES),
    (300, 8, 1, WIDE_TILES),
    (1, 96, 4, SMALL_TILES),
    (7, 96, 4, WIDE_TILES),
    (64, 96, 1, WIDE_TILES),
    (300, 96, 2, WIDE_TILES),
]


pytestmark = pytest.mark.usefixtures("poisoned_buffers")


def _pools(num_experts, dtype, gen):
    return moe_pools(num_experts, H, F, dtype, gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T%d-E%d-k%d-BM%d-BN%d" % (*c[:3], c[3].BLOCK_M, c[3].BLOCK_N))
def test_matches_reference(case, dtype):
    num_tokens, num_experts, top_k, config = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr((case, dtype)).encode()))  # fresh per case
    hidden = torch.randn(num_tokens, H, generator=gen).to(dtype).to(DEVICE)
    w_gate_up, w_down = _pools(num_experts, dtype, gen)
    ids = distinct_choices(num_tokens, num_experts, top_k, gen).to(DEVICE)
    weights = torch.rand(num_tokens, top_k, generator=gen).to(DEVICE)
    run_and_compare(hidden, w_gate_up, w_down, ids, weights, config)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_skewed_routing_leaves_unused_experts_unread(dtype):
    # 300 tokens over 3 of 96 experts (repeats allowed); the other 93 experts' weights
    # are NaN, so any program that multiplied by them would poison the output.
    gen = torch.Generator().manual_seed(7)
    num_experts, used = 96, torch.tensor([5, 40, 41])
    hidden = torch.randn(300, H, generator=gen).to(dtype).to(DEVICE)
    w_gate_up, w_down = _pools(num_experts, dtype, gen)
    unused = torch.ones(num_experts, dtype=torch.bool)
    unused[used] = False
    w_gate_up[unused.to(DEVICE)] = float("nan")
    w_down[unused.to(DEVICE)] = float("nan")
    ids = used[torch.randint(0, 3, (300, 2), generator=gen)].to(torch.int32).to(DEVICE)
    weights = torch.rand(300, 2, generator=gen).to(DEVICE)
    run_and_compare(hidden, w_gate_up, w_down, ids, weights, TALL_TILES)


def test_default_config_and_int64_ids():
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(33, H, generator=gen).to(DEVICE)
    w_gate_up, w_down = _pools(8, torch.float32, gen)
    ids = distinct_choices(33, 8, 2, gen).long().to(DEVICE)
    weights = torch.rand(33, 2, generator=gen).to(DEVICE)
    run_and_compare(hidden, w_gate_up, w_down, ids, weights, None)


def test_pools_are_used_in_place_through_strided_views():
    # A pool that is a view into a larger buffer (every other expert, padded rows and
    # columns) must work as is: the wrapper asserts strides rather than copying.
    gen = torch.Generator().manual_seed(9)
    big_gu = torch.randn(16, 2 * F + 8, H + 24, generator=gen).to(DEVICE) / H**0.5
    big_d = torch.randn(16, H + 4, F + 8, generator=gen).to(DEVICE) / F**0.5
    w_gate_up, w_down = big_gu[::2, : 2 * F, :H], big_d[::2, :H, :F]  # [8, 2F, H], [8, H, F]
    assert not w_gate_up.is_contiguous() and not w_down.is_contiguous()
    hidden = torch.randn(20, H, generator=gen).to(DEVICE)
    ids = distinct_choices(20, 8, 2, gen).to(DEVICE)
    weights = torch.rand(20, 2, generator=gen).to(DEVICE)
    run_and_compare(hidden, w_gate_up, w_down, ids, weights, SMALL_TILES)


def test_rejects_pools_without_unit_inner_stride():
    hidden = torch.randn(4, H, device=DEVICE)
    w_gate_up = torch.randn(2, H, 2 * F, device=DEVICE).transpose(1, 2)  # [2, 2F, H], H strided
    w_down = torch.randn(2, H, F, device=DEVICE)
    ids = torch.zeros(4, 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(AssertionError, match="unit stride"):
        fused_pool_moe(hidden, w_gate_up, w_down, ids, torch.ones(4, 1, device=DEVICE))
