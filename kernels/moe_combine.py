"""Combine of the pool MoE: per token, the sum of its k slot rows and SPLIT_K partials.

out[t, n] = sum over j < k with ids[t, j] < E, and s < SPLIT_K, of part[s, t*k + j, n],
added in fp32 and stored in out's dtype. Dropped slots (id E) are skipped: no GEMM
program wrote their rows, which may hold anything. The torch equivalent (the
reference the tests use) is a masked sum over the split and k dimensions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _combine_kernel(
    part_ptr, ids_ptr, out_ptr,
    num_tokens, N, num_experts, stride_ps, stride_pm, stride_om,
    TOP_K: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    token_ok = tokens < num_tokens
    col_ok = cols < N
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        slots = tokens.to(tl.int64) * TOP_K + j  # [BT]
        expert = tl.load(ids_ptr + slots, mask=token_ok, other=num_experts)
        kept = token_ok & (expert >= 0) & (expert < num_experts)
        ptrs = part_ptr + slots[:, None] * stride_pm + cols[None, :]
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(ptrs + s * stride_ps, mask=kept[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    out_ptrs = out_ptr + tokens[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=token_ok[:, None] & col_ok[None, :])


def combine_slot_rows(part: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, out: torch.Tensor) -> torch.Tensor:
    """part [SPLIT_K, T*k, N] (fp32 or out's dtype); topk_ids [T, k]; out [T, N]. Returns out."""
    num_tokens, top_k = topk_ids.shape
    split_k, num_slots, n = part.shape
    assert num_slots == num_tokens * top_k and out.shape == (num_tokens, n), (tuple(part.shape), tuple(out.shape))
    assert part.stride(2) == 1 and out.stride(1) == 1, "combine needs unit column strides"
    assert topk_ids.is_contiguous(), "slot t*k + j must be topk_ids[t, j]"
    if num_tokens == 0:
        return out
    block_n = min(256, triton.next_power_of_2(n))
    block_t = max(1, min(16, 4096 // block_n))
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(n, block_n))
    _combine_kernel[grid](
        part, topk_ids, out, num_tokens, n, num_experts, part.stride(0), part.stride(1), out.stride(0),
        TOP_K=top_k, SPLIT_K=split_k, BLOCK_T=block_t, BLOCK_N=block_n, num_warps=4,
    )
    return out
