"""Block-aligned sort of the (token, k) routing slots by expert, in torch: the reference.

Slot s = t * k + j is token t's j-th choice. Each expert's slots are laid out
contiguously and padded to a multiple of BLOCK_M, so every BLOCK_M-row block of
the grouped GEMMs belongs to exactly one expert. Experts with no slot get no
block, so no GEMM program ever reads their weights.

Dropped slots: an id equal to E (the pool size) marks a slot dropped, e.g. by a
per-token expert budget. It is counted for no expert and placed in no block, so
no GEMM program visits it; fused_pool_moe and pool_moe give it no contribution.

Everything stays on the device with shapes known on the host (no .item(), no
sync), so the step can sit inside a CUDA graph. fused_align.py does the same in
one Triton launch and is what fused_pool_moe runs; this version is its test
reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AlignedSlots:
    """Slots grouped by expert. S = T*k slots, B = max_blocks (a host-side bound)."""

    sorted_slots: torch.Tensor  # [B * BLOCK_M] int32: slot ids; padding holds S
    block_expert: torch.Tensor  # [B] int32: expert of each block; unused blocks hold E
    max_blocks: int  # grid bound: blocks past the real count exit at once


def max_aligned_blocks(num_slots: int, num_experts: int, block_m: int) -> int:
    """Upper bound on sum_e ceil(count_e / BLOCK_M): at most min(E, S) experts are non-empty."""
    touched = min(num_experts, num_slots)
    return -(-(num_slots + touched * (block_m - 1)) // block_m)


def align_slots_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedSlots:
    """topk_ids [T, k] int, values in [0, E] (E = dropped) -> AlignedSlots.

    Stable: within an expert, slots keep token order.
    """
    flat = topk_ids.reshape(-1).long()  # [S]
    num_slots = flat.numel()
    device = flat.device
    max_blocks = max_aligned_blocks(num_slots, num_experts, block_m)

    # scatter_add rather than bincount: CUDA bincount reads max() back to the host.
    # Bin E collects the dropped slots and is then cut off: they count for no expert.
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    counts = counts[:num_experts]  # [E] slots per expert
    blocks = (counts + block_m - 1) // block_m  # [E] blocks per expert (0 when unused)
    block_end = torch.cumsum(blocks, 0)  # [E] exclusive end, in blocks
    padded_start = (block_end - blocks) * block_m  # [E] first row of each expert
    slot_start = torch.cumsum(counts, 0) - counts  # [E] first sorted slot of each expert

    # Dropped slots sort last (id E) and are written to one trash row past the end,
    # which is cut off: the slot count of real experts is not known on the host.
    trash = max_blocks * block_m
    # pad, not cat with a new tensor: no host-to-device copy, so CUDA graphs can capture it.
    padded_start = F.pad(padded_start, (0, 1), value=trash)  # [E + 1]
    slot_start = F.pad(slot_start, (0, 1), value=0)  # [E + 1]
    order = torch.argsort(flat, stable=True)  # [S] slot ids sorted by expert
    experts = flat[order]  # [S]
    rank = torch.arange(num_slots, device=device) - slot_start[experts]  # [S] rank within expert
    dest = torch.where(experts < num_experts, padded_start[experts] + rank, trash)  # [S]
    sorted_slots = torch.full((trash + 1,), num_slots, dtype=torch.int32, device=device)
    sorted_slots[dest] = order.to(torch.int32)

    # Block b belongs to the first expert whose block_end exceeds b; blocks past the
    # total land on E, the "nothing to do" sentinel.
    block_ids = torch.arange(max_blocks, device=device)  # [B]
    block_expert = torch.searchsorted(block_end, block_ids, right=True).to(torch.int32)  # [B]
    return AlignedSlots(sorted_slots[:trash], block_expert, max_blocks)
