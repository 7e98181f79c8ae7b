"""Block-aligned sort of the (token, k) routing slots by expert, in torch.

Slot s = t * k + j is token t's j-th choice. Each expert's slots are laid out
contiguously and padded to a multiple of BLOCK_M, so every BLOCK_M-row block of
the grouped GEMMs belongs to exactly one expert. Experts with no slot get no
block, so no GEMM program ever reads their weights.

Everything stays on the device with shapes known on the host (no .item(), no
sync), so the step can sit inside a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    """topk_ids [T, k] int -> AlignedSlots (stable: within an expert, slots keep token order)."""
    flat = topk_ids.reshape(-1).long()  # [S]
    num_slots = flat.numel()
    device = flat.device
    max_blocks = max_aligned_blocks(num_slots, num_experts, block_m)

    # scatter_add rather than bincount: CUDA bincount reads max() back to the host.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # [E] slots per expert
    blocks = (counts + block_m - 1) // block_m  # [E] blocks per expert (0 when unused)
    block_end = torch.cumsum(blocks, 0)  # [E] exclusive end, in blocks
    padded_start = (block_end - blocks) * block_m  # [E] first row of each expert
    slot_start = torch.cumsum(counts, 0) - counts  # [E] first sorted slot of each expert

    order = torch.argsort(flat, stable=True)  # [S] slot ids sorted by expert
    experts = flat[order]  # [S]
    rank = torch.arange(num_slots, device=device) - slot_start[experts]  # [S] rank within expert
    sorted_slots = torch.full((max_blocks * block_m,), num_slots, dtype=torch.int32, device=device)
    sorted_slots[padded_start[experts] + rank] = order.to(torch.int32)

    # Block b belongs to the first expert whose block_end exceeds b; blocks past the
    # total land on E, the "nothing to do" sentinel.
    block_ids = torch.arange(max_blocks, device=device)  # [B]
    block_expert = torch.searchsorted(block_end, block_ids, right=True).to(torch.int32)  # [B]
    return AlignedSlots(sorted_slots, block_expert, max_blocks)
