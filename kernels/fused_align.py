"""Block-aligned sort of the routing slots by expert in one Triton launch.

Same result as moe_align.align_slots_by_expert (the reference; read its
docstring): slots grouped by expert, each expert padded to BLOCK_M rows, a
block -> expert map, blocks past the real count marked E, dropped slots (id E)
placed nowhere. Stable: within an expert, slots keep token order.

One program per expert plus one more (grid E + 1, known on the host, so the
launch can be captured in a CUDA graph; nothing is read back). Every program
counts all S slots itself (a histogram over [0, E]) instead of waiting for the
others: no atomics, no inter-program sync, and the result is deterministic.
Program e then knows how many blocks the experts before it own, and writes its
own slots (in token order, by a running prefix sum), the padding of its last
block and its entries of the block map. Program E fills the blocks past the
real count. Each program reads the S ids twice, so the cost grows with E x S;
at decode sizes that is a few kilobytes per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .moe_align import AlignedSlots, max_aligned_blocks

MAX_CHUNK = 4096  # slot ids per program per loop step


@triton.jit
def _align_kernel(
    ids_ptr, sorted_slots_ptr, block_expert_ptr, zero_ptr,
    num_slots, num_experts, max_blocks, zero_cols, stride_zero,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr,
    ZERO_DROPPED_ROWS: tl.constexpr, ZERO_ROWS: tl.constexpr, ZERO_COLS: tl.constexpr,
):
    program = tl.program_id(0)  # expert id; program E owns the tail blocks
    lanes = tl.arange(0, CHUNK)
    bins = tl.arange(0, BLOCK_E)

    # 1. Slots per expert. Ids outside [0, E) (dropped, or lanes past S) go to bin E,
    # which counts for nobody; the clamp also keeps the histogram in bounds.
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(0, num_slots, CHUNK):
        offs = start + lanes
        ids = tl.load(ids_ptr + offs, mask=offs < num_slots, other=num_experts).to(tl.int32)
        ids = tl.where((ids >= 0) & (ids < num_experts), ids, num_experts)
        counts += tl.histogram(ids, BLOCK_E)
    blocks = tl.where(bins < num_experts, (counts + BLOCK_M - 1) // BLOCK_M, 0)  # [BE]
    total_blocks = tl.sum(blocks, axis=0)

    if program < num_experts:
        first_block = tl.sum(tl.where(bins < program, blocks, 0), axis=0)
        own_blocks = tl.sum(tl.where(bins == program, blocks, 0), axis=0)
        own_count = tl.sum(tl.where(bins == program, counts, 0), axis=0)
        first_row = first_block * BLOCK_M
        # 2. This expert's slots, in token order: rank = slots of this expert before it.
        seen = own_count * 0  # an int32 scalar, as the loop carries it
        for start in range(0, num_slots, CHUNK):
            offs = start + lanes
            ids = tl.load(ids_ptr + offs, mask=offs < num_slots, other=num_experts).to(tl.int32)
            mine = ((ids == program) & (offs < num_slots)).to(tl.int32)
            rank = seen + tl.cumsum(mine, axis=0) - 1
            tl.store(sorted_slots_ptr + first_row + rank, offs, mask=mine != 0)
            seen += tl.sum(mine, axis=0)
        # 3. Padding rows of the last block (fewer than BLOCK_M) hold S.
        pad = own_count + tl.arange(0, BLOCK_M)
        tl.store(sorted_slots_ptr + first_row + pad, num_slots, mask=pad < own_blocks * BLOCK_M)
        # 4. This expert's entries of the block map.
        for b0 in range(0, own_blocks, CHUNK):
            b = b0 + lanes
            tl.store(block_expert_ptr + first_block + b, program, mask=b < own_blocks)
    else:
        # Blocks past the real count: expert E ("exit at once") and padding rows.
        for b0 in range(total_blocks, max_blocks, CHUNK):
            b = b0 + lanes
            tl.store(block_expert_ptr + b, num_experts, mask=b < max_blocks)
        for r0 in range(total_blocks * BLOCK_M, max_blocks * BLOCK_M, CHUNK):
            r = r0 + lanes
            tl.store(sorted_slots_ptr + r, num_slots, mask=r < max_blocks * BLOCK_M)

    if ZERO_DROPPED_ROWS:
        # k = 1: the down GEMM writes output row t = slot directly, and no program
        # visits a dropped slot, so its row is cleared here. Programs share the work
        # by slot (program p takes slots p, p + E + 1, ...): no single program loops
        # over all S rows.
        rows_local = tl.arange(0, ZERO_ROWS)
        cols_local = tl.arange(0, ZERO_COLS)
        stride = tl.num_programs(0)
        for r0 in range(0, num_slots, ZERO_ROWS * stride):
            rows = r0 + rows_local * stride + program
            ids = tl.load(ids_ptr + rows, mask=rows < num_slots, other=0).to(tl.int32)
            dropped = (rows < num_slots) & ((ids < 0) | (ids >= num_experts))
            if tl.max(dropped.to(tl.int32), axis=0) > 0:
                for c0 in range(0, zero_cols, ZERO_COLS):
                    cols = c0 + cols_local
                    ptrs = zero_ptr + rows[:, None].to(tl.int64) * stride_zero + cols[None, :]
                    zeros = tl.zeros([ZERO_ROWS, ZERO_COLS], dtype=zero_ptr.dtype.element_ty)
                    tl.store(ptrs, zeros, mask=dropped[:, None] & (cols < zero_cols)[None, :])


def _index_buffer(size: int, device: torch.device) -> torch.Tensor:
    """Output buffers, every element written by the kernel (tests replace this to poison them)."""
    return torch.empty(size, dtype=torch.int32, device=device)


def fused_align_slots_by_expert(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_m: int,
    *,
    zero_dropped_rows: torch.Tensor | None = None,
) -> AlignedSlots:
    """topk_ids [T, k] int32/int64, values in [0, E] (E = dropped) -> AlignedSlots.

    zero_dropped_rows: an [S, N] tensor (unit column stride) whose rows at dropped
    slots are set to zero in the same launch; fused_pool_moe passes its output
    when k = 1, where the down GEMM writes output rows directly.
    """
    assert topk_ids.dtype in (torch.int32, torch.int64), topk_ids.dtype
    assert num_experts >= 1 and block_m >= 1 and block_m & (block_m - 1) == 0, (num_experts, block_m)
    flat = topk_ids.reshape(-1)  # [S]; a view when topk_ids is contiguous
    num_slots = flat.numel()
    device = flat.device
    max_blocks = max_aligned_blocks(num_slots, num_experts, block_m)
    sorted_slots = _index_buffer(max_blocks * block_m, device)
    block_expert = _index_buffer(max_blocks, device)
    if num_slots == 0:
        return AlignedSlots(sorted_slots, block_expert, max_blocks)
    zero = zero_dropped_rows
    if zero is not None:
        assert zero.dim() == 2 and zero.shape[0] == num_slots and zero.stride(1) == 1, tuple(zero.shape)
        assert zero.device == device

    chunk = min(MAX_CHUNK, max(16, triton.next_power_of_2(num_slots)))
    _align_kernel[(num_experts + 1,)](
        flat, sorted_slots, block_expert, flat if zero is None else zero,
        num_slots, num_experts, max_blocks,
        0 if zero is None else zero.shape[1], 0 if zero is None else zero.stride(0),
        BLOCK_M=block_m,
        BLOCK_E=max(32, triton.next_power_of_2(num_experts + 1)),  # bin E collects the dropped
        CHUNK=chunk, ZERO_DROPPED_ROWS=zero is not None, ZERO_ROWS=16, ZERO_COLS=128,
        num_warps=8 if chunk >= 2048 else 4,
    )
    return AlignedSlots(sorted_slots, block_expert, max_blocks)
