"""fused_align_slots_by_expert == moe_align.align_slots_by_expert, and the reference's own contract.

Compared per block: the same block -> expert map, and in each block the same set of
slots (what the GEMMs need); the order inside an expert is checked separately
because the docstrings promise it (stable, token order).
"""

from __future__ import annotations

import zlib

import pytest
import torch
from kernel_checks import DEVICE

from unipool_serve.kernels import fused_align
from unipool_serve.kernels.fused_align import fused_align_slots_by_expert
from unipool_serve.kernels.moe_align import align_slots_by_expert

# (T, k, E, BLOCK_M, fraction of slots dropped)
CASES = [
    (1, 1, 1, 16, 0.0),
    (1, 4, 96, 16, 0.0),
    (2, 2, 8, 16, 0.5),
    (7, 2, 8, 16, 0.0),
    (50, 3, 96, 32, 0.2),
    (300, 4, 8, 64, 0.1),
]
POISON = -7  # what the poisoned_buffers fixture (conftest.py) fills the index buffers with
pytestmark = pytest.mark.usefixtures("poisoned_buffers")


def _routing(num_tokens, top_k, num_experts, dropped, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, num_experts, (num_tokens, top_k), generator=gen, dtype=torch.int32)
    ids[torch.rand(num_tokens, top_k, generator=gen) < dropped] = num_experts  # id E: dropped
    return ids


def _blocks_as_sets(aligned, num_slots, block_m):
    rows = aligned.sorted_slots.cpu().view(-1, block_m)  # [B, BLOCK_M]
    return [sorted(r[r < num_slots].tolist()) for r in rows]


def _check_against_reference(ids, num_experts, block_m):
    got = fused_align_slots_by_expert(ids.to(DEVICE), num_experts, block_m)
    want = align_slots_by_expert(ids, num_experts, block_m)
    num_slots = ids.numel()
    assert got.max_blocks == want.max_blocks
    assert not (got.sorted_slots == POISON).any() and not (got.block_expert == POISON).any()
    torch.testing.assert_close(got.block_expert.cpu(), want.block_expert, rtol=0, atol=0)
    assert _blocks_as_sets(got, num_slots, block_m) == _blocks_as_sets(want, num_slots, block_m)
    # Padding rows hold S (no slot id is ever out of range for the GEMMs' loads).
    assert ((got.sorted_slots >= 0) & (got.sorted_slots <= num_slots)).all()
    return got, want


@pytest.mark.parametrize("case", CASES, ids=lambda c: "T%d-k%d-E%d-BM%d-drop%.1f" % c)
def test_matches_reference_per_block(case):
    num_tokens, top_k, num_experts, block_m, dropped = case
    ids = _routing(num_tokens, top_k, num_experts, dropped, seed=zlib.crc32(repr(case).encode()))
    _check_against_reference(ids, num_experts, block_m)


def test_order_within_an_expert_is_token_order():
    ids = _routing(64, 2, 8, 0.25, seed=3)
    got, want = _check_against_reference(ids, 8, 16)
    torch.testing.assert_close(got.sorted_slots.cpu(), want.sorted_slots, rtol=0, atol=0)


def test_many_loop_steps(monkeypatch):
    # A chunk of 16 slot ids per step, so S = 600 takes 38 steps in every loop.
    monkeypatch.setattr(fused_align, "MAX_CHUNK", 16)
    ids = _routing(200, 3, 8, 0.1, seed=4)
    got, want = _check_against_reference(ids, 8, 16)
    torch.testing.assert_close(got.sorted_slots.cpu(), want.sorted_slots, rtol=0, atol=0)


def test_int64_ids_and_everything_dropped():
    ids = torch.full((5, 2), 8, dtype=torch.int64)  # every slot dropped
    got, _ = _check_against_reference(ids, 8, 16)
    assert (got.block_expert == 8).all() and (got.sorted_slots == 10).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_zero_dropped_rows(dtype):
    # k = 1: rows of dropped slots are set to zero in the same launch, other rows untouched.
    ids = _routing(40, 1, 8, 0.3, seed=5)
    rows = torch.full((40, 24), float("nan"), dtype=dtype, device=DEVICE)
    fused_align_slots_by_expert(ids.to(DEVICE), 8, 16, zero_dropped_rows=rows)
    dropped = (ids.reshape(-1) == 8).to(DEVICE)
    assert dropped.any() and (rows[dropped] == 0).all() and rows[~dropped].isnan().all()


@pytest.mark.parametrize("num_tokens,top_k,num_experts,block_m",
                         [(50, 3, 96, 16), (50, 3, 96, 32), (16384, 4, 384, 64)])
def test_reference_gives_blocks_only_to_used_experts(num_tokens, top_k, num_experts, block_m):
    gen = torch.Generator().manual_seed(block_m)
    # Only every 7th expert is ever chosen, so most experts get no slot; some slots are dropped.
    ids = torch.randint(0, num_experts // 7, (num_tokens, top_k), generator=gen) * 7
    ids[torch.rand(num_tokens, top_k, generator=gen) < 0.1] = num_experts
    aligned = align_slots_by_expert(ids, num_experts, block_m)
    flat = ids.reshape(-1)
    kept = flat < num_experts
    counts = torch.bincount(flat[kept], minlength=num_experts)
    real = aligned.block_expert < num_experts
    # Exactly ceil(count / BLOCK_M) blocks per expert, in expert order, none for unused experts.
    want = torch.repeat_interleave(torch.arange(num_experts), (counts + block_m - 1) // block_m)
    assert torch.equal(aligned.block_expert[real].long(), want)
    assert real.sum() <= aligned.max_blocks and not real[int(real.sum()):].any()
    # Every kept slot appears once, in the block of its own expert; dropped ones nowhere.
    rows = aligned.sorted_slots.view(-1, block_m)[real]  # [real blocks, BLOCK_M]
    slots = rows[rows < flat.numel()]
    assert torch.equal(slots.sort().values, torch.nonzero(kept).squeeze(1).to(torch.int32))
    owner = aligned.block_expert[real].long().unsqueeze(1).expand_as(rows)[rows < flat.numel()]
    assert torch.equal(flat[slots.long()], owner)
    assert (aligned.sorted_slots.view(-1, block_m)[~real] == flat.numel()).all()
