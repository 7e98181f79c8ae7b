"""The small-T path (narrow tiles, split-K on the down GEMM) and dropped slots (id E) against pool_moe."""

from __future__ import annotations

import zlib

import pytest
import torch
from kernel_checks import DEVICE, DTYPES, distinct_choices, moe_pools, run_and_compare

from unipool_serve.kernels.launch_config import MoELaunchConfig
from unipool_serve.kernels.moe_reference import pool_moe

pytestmark = pytest.mark.usefixtures("poisoned_buffers")

H, F = 40, 72  # not multiples of any block size: tails in N and in every K range


def split(split_k: int, block_k: int = 16, block_n: int = 32) -> MoELaunchConfig:
    return MoELaunchConfig(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=1, num_warps=4,
                           num_stages=2, SPLIT_K=split_k)


# (T, E, k, config). F = 72 over BLOCK_K 16: SPLIT_K 3 gives ranges of 32, 32 and 8;
# SPLIT_K 8 gives five ranges of 16 and three empty ones, which must write zeros.
SMALL_T_CASES = [
    (1, 8, 1, split(4)),
    (1, 96, 4, split(8)),
    (2, 8, 2, split(3)),
    (2, 8, 1, split(1)),
    (4, 8, 4, split(2, block_k=32)),
    (4, 96, 1, split(16)),
    (8, 8, 2, split(8)),
    (8, 16, 8, split(2, block_n=16)),
    (8, 8, 1, None),  # the heuristic default
]


def _case_id(case):
    config = case[3]
    return "T%d-E%d-k%d-" % case[:3] + ("default" if config is None else f"split{config.SPLIT_K}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SMALL_T_CASES, ids=_case_id)
def test_small_t_matches_reference(case, dtype):
    num_tokens, num_experts, top_k, config = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr((case, dtype)).encode()))  # fresh per case
    hidden = torch.randn(num_tokens, H, generator=gen).to(dtype).to(DEVICE)
    w_gate_up, w_down = moe_pools(num_experts, H, F, dtype, gen)
    ids = distinct_choices(num_tokens, num_experts, top_k, gen).to(DEVICE)
    weights = torch.rand(num_tokens, top_k, generator=gen).to(DEVICE)
    run_and_compare(hidden, w_gate_up, w_down, ids, weights, config)


# (T, k, config): each way the output is produced. k = 1 without a split writes rows
# directly (the align clears dropped rows); split-K and k > 1 go through the combine.
DROP_CASES = [(9, 1, split(1)), (9, 1, split(4)), (7, 2, split(1)), (5, 4, split(3))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DROP_CASES, ids=lambda c: "T%d-k%d-split%d" % (c[0], c[1], c[2].SPLIT_K))
def test_dropped_slots_contribute_nothing(case, dtype):
    num_tokens, top_k, config = case
    num_experts = 8
    gen = torch.Generator().manual_seed(zlib.crc32(repr((case, dtype)).encode()))
    hidden = torch.randn(num_tokens, H, generator=gen).to(dtype).to(DEVICE)
    w_gate_up, w_down = moe_pools(num_experts, H, F, dtype, gen)
    ids = distinct_choices(num_tokens, num_experts, top_k, gen)
    ids[torch.rand(num_tokens, top_k, generator=gen) < 0.4] = num_experts
    ids[0] = num_experts  # token 0 loses every choice: its output row is exactly zero
    ids[1] = distinct_choices(1, num_experts, top_k, gen)  # token 1 keeps all of them
    weights = torch.rand(num_tokens, top_k, generator=gen)
    weights[ids == num_experts] = float("nan")  # a dropped slot's weight must never be read
    got = run_and_compare(hidden, w_gate_up, w_down, ids.to(DEVICE), weights.to(DEVICE), config)
    assert (got[0] == 0).all()


def test_reference_drop_equals_zero_weight():
    # pool_moe's own contract: a dropped slot is the same as that choice with weight 0.
    gen = torch.Generator().manual_seed(12)
    hidden = torch.randn(6, H, generator=gen)
    w_gate_up, w_down = (w.cpu() for w in moe_pools(8, H, F, torch.float32, gen))
    ids = distinct_choices(6, 8, 3, gen)
    weights = torch.rand(6, 3, generator=gen)
    dropped = torch.rand(6, 3, generator=gen) < 0.4
    with_drop = pool_moe(hidden, w_gate_up, w_down, torch.where(dropped, 8, ids), weights)
    zero_weight = pool_moe(hidden, w_gate_up, w_down, ids, torch.where(dropped, 0.0, weights))
    torch.testing.assert_close(with_drop, zero_weight, rtol=1e-6, atol=1e-6)
