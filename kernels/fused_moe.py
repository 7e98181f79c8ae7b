"""Fused pool MoE: grouped GEMMs over a shared expert pool, in Triton.

Legend: T tokens, H hidden, F expert width, E experts in the pool, k choices per
token, S = T*k routing slots. Same contract as moe_reference.pool_moe, including
dropped slots (id E: no block, no weights read, no contribution).

1. align (fused_align.py, one launch): slots sorted by expert, each expert padded to
   BLOCK_M rows; experts with no slot own no block, so their weights are never read.
2. gate_up GEMM: [rows of hidden] x w_gate_up[e]^T, gate and up tiles computed by the
   same program so SiLU(gate) * up is fused before the store -> inter [S, F].
3. down GEMM: inter x w_down[e]^T, scaled by the slot's routing weight -> [S, H];
   with SPLIT_K > 1 each program reduces one K range into fp32 partials [SPLIT_K, S, H].
4. combine (moe_combine.py): k == 1 without a split writes straight into the output
   (slot == token; the align clears dropped tokens' rows); otherwise one kernel sums
   each token's kept slot rows and partials in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_align import fused_align_slots_by_expert
from .launch_config import MoELaunchConfig, get_config
from .moe_combine import combine_slot_rows


@triton.jit
def _expert_gemm_kernel(
    a_ptr, b_ptr, c_ptr, slots_ptr, block_expert_ptr, weights_ptr,
    N, K, num_slots, num_experts, a_row_div, num_m_blocks, up_offset,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cs, stride_cm, stride_cn,
    GATED: tl.constexpr, WEIGHTED: tl.constexpr, IEEE_FP32: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[split, slot, n] = act(A[slot // a_row_div, K range] @ B[e, n, K range]) for one block.

    GATED: B holds gate rows [0, N) and up rows [N, 2N) (up_offset = N * stride_bn);
    act = SiLU(gate) * up. WEIGHTED: rows are scaled by the slot's routing weight.
    SPLIT_K: program_id(1) picks one of SPLIT_K K ranges (whole BLOCK_K steps) and
    writes its partial sum at C + split * stride_cs; GATED needs SPLIT_K == 1.
    """
    # Grouped ordering: GROUP_M row blocks share each weight tile while it is in L2.
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n_blocks
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    expert = tl.load(block_expert_ptr + pid_m)
    if expert >= num_experts:  # past the last real block: nothing to do
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    slots = tl.load(slots_ptr + offs_m)  # [BM]; padding rows hold num_slots
    row_ok = slots < num_slots
    a_rows = (slots // a_row_div).to(tl.int64)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)  # [BK]

    if SPLIT_K == 1:  # resolved at compile time: the unsplit loop stays exactly 0..K
        k_begin = 0
        k_end = K
    else:
        split = tl.program_id(1)
        k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_begin = split * k_per_split
        k_end = tl.minimum(K, k_begin + k_per_split)
        c_ptr += split.to(tl.int64) * stride_cs  # this range's partial-sum plane

    a_ptrs = a_ptr + a_rows[:, None] * stride_am + (k_begin + offs_k[None, :]) * stride_ak  # [BM, BK]
    b_ptrs = (b_ptr + expert.to(tl.int64) * stride_be
              + offs_n[None, :].to(tl.int64) * stride_bn + (k_begin + offs_k[:, None]) * stride_bk)  # [BK, BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_ok = offs_k < k_end - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b_mask = k_ok[:, None] & n_ok[None, :]
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        if GATED:
            b_up = tl.load(b_ptrs + up_offset, mask=b_mask, other=0.0)
        if IEEE_FP32:  # fp32 inputs: exact products, not the tf32 default
            acc = tl.dot(a, b, acc, input_precision="ieee")
            if GATED:
                acc_up = tl.dot(a, b_up, acc_up, input_precision="ieee")
        else:  # fp16/bf16: the backend's default (every backend accepts it)
            acc = tl.dot(a, b, acc)
            if GATED:
                acc_up = tl.dot(a, b_up, acc_up)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up  # SiLU(gate) * up, still fp32
    if WEIGHTED:
        acc = acc * tl.load(weights_ptr + slots, mask=row_ok, other=0.0)[:, None]
    c_ptrs = c_ptr + slots[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def _workspace(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Scratch buffers (tests replace this to poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch_expert_gemm(a, b, c, aligned, weights, *, n, k, num_slots, num_experts, a_row_div,
                        up_offset, gated, split_k, config: MoELaunchConfig):
    """c: [S, n], or [split_k, S, n] fp32 partials when split_k > 1."""
    assert not (gated and split_k > 1), "SiLU(gate) * up needs the whole K sum"
    c3 = c if c.dim() == 3 else c.unsqueeze(0)  # [split_k, S, n]
    assert c3.shape[0] == split_k and (split_k == 1 or c3.dtype == torch.float32)
    grid = (aligned.max_blocks * triton.cdiv(n, config.BLOCK_N), split_k)
    _expert_gemm_kernel[grid](
        a, b, c3, aligned.sorted_slots, aligned.block_expert, weights,
        n, k, num_slots, num_experts, a_row_div, aligned.max_blocks, up_offset,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
        c3.stride(0), c3.stride(1), c3.stride(2),
        GATED=gated, WEIGHTED=not gated, SPLIT_K=split_k,
        IEEE_FP32=a.dtype == torch.float32,
        BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, BLOCK_K=config.BLOCK_K, GROUP_M=config.GROUP_M,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def fused_pool_moe(
    hidden: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    config: MoELaunchConfig | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton `pool_moe`: out[t] = sum_j w[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)).

    hidden [T, H]; w_gate_up [E, 2F, H] (gate rows first); w_down [E, H, F]; topk_ids
    [T, k] int32/int64 in [0, E] (E = dropped slot); topk_weights [T, k] fp32. The pool
    tensors are used in place: any expert and row strides, unit stride along the reduced
    (last) dim. Returns [T, H] in hidden's dtype (written into `out` when given).
    """
    num_tokens, hidden_size = hidden.shape
    num_experts, two_f, h_gu = w_gate_up.shape
    ffn = two_f // 2
    top_k = topk_ids.shape[1]
    dtype, device = hidden.dtype, hidden.device
    assert dtype in (torch.bfloat16, torch.float16, torch.float32), dtype
    assert w_gate_up.dtype == w_down.dtype == dtype, "hidden and both pools must share a dtype"
    assert two_f % 2 == 0 and h_gu == hidden_size, f"w_gate_up {tuple(w_gate_up.shape)} vs H={hidden_size}"
    assert w_down.shape == (num_experts, hidden_size, ffn), f"w_down {tuple(w_down.shape)} != [E, H, F]"
    # The pools are never copied: the K-loop wants unit stride along H (gate_up) and F (down).
    assert w_gate_up.stride(2) == 1 and w_down.stride(2) == 1, "pool tensors need unit stride on the last dim"
    assert hidden.stride(1) == 1, "hidden needs unit stride on H"
    assert topk_ids.dim() == 2 and topk_ids.shape[0] == num_tokens and top_k >= 1
    assert topk_ids.dtype in (torch.int32, torch.int64)
    assert topk_weights.shape == topk_ids.shape and topk_weights.dtype == torch.float32
    for t in (w_gate_up, w_down, topk_ids, topk_weights):
        assert t.device == device, "all inputs must sit on one device"
    if out is None:
        out = torch.empty(num_tokens, hidden_size, dtype=dtype, device=device)
    assert out.shape == (num_tokens, hidden_size) and out.dtype == dtype and out.stride(1) == 1
    if num_tokens == 0:
        return out

    if config is None:
        config = get_config(num_tokens, num_experts, hidden_size, ffn, top_k, dtype)
    num_slots = num_tokens * top_k
    split_k = config.SPLIT_K
    ids = topk_ids.contiguous()  # slot t*k + j is ids[t, j] for the align and the combine
    weights = topk_weights.contiguous().view(-1)  # [S], indexed by slot
    # k == 1 without a split: slot == token, so the down GEMM writes the output rows
    # directly, and the align clears the rows of dropped tokens, which no GEMM visits.
    direct = top_k == 1 and split_k == 1
    aligned = fused_align_slots_by_expert(ids, num_experts, config.BLOCK_M,
                                          zero_dropped_rows=out if direct else None)

    inter = _workspace((num_slots, ffn), dtype, device)  # [S, F]
    _launch_expert_gemm(hidden, w_gate_up, inter, aligned, weights, n=ffn, k=hidden_size,
                        num_slots=num_slots, num_experts=num_experts, a_row_div=top_k,
                        up_offset=ffn * w_gate_up.stride(1), gated=True, split_k=1, config=config)
    if direct:
        down_out = out  # [S, H] == [T, H]
    elif split_k == 1:
        down_out = _workspace((num_slots, hidden_size), dtype, device)  # [S, H]
    else:  # fp32 partials: rounding to the activation dtype waits for the sum
        down_out = _workspace((split_k, num_slots, hidden_size), torch.float32, device)  # [SPLIT_K, S, H]
    _launch_expert_gemm(inter, w_down, down_out, aligned, weights, n=hidden_size, k=ffn,
                        num_slots=num_slots, num_experts=num_experts, a_row_div=1,
                        up_offset=0, gated=False, split_k=split_k, config=config)
    if not direct:
        part = down_out if down_out.dim() == 3 else down_out.unsqueeze(0)  # [SPLIT_K, S, H]
        combine_slot_rows(part, ids, num_experts, out)
    return out
