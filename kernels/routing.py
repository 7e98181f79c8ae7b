"""Fused steered routing: one Triton launch per layer.

Semantics are exactly `routing_reference.route_with_table` (read its docstring):
per-token-sigma steering bias, include/exclude masks, norm/softmax/sigmoid scores,
top-k with includes first, excludes last and ties to the lower expert id.

Shapes: T tokens, E experts in the layer's pool (E <= 4096), k chosen per token,
P steering profiles, L layers. Each program owns BLOCK_T tokens and holds their
whole [BLOCK_T, BLOCK_E] logit tile in registers, so every reduction (sigma,
ceiling, norm, softmax sum, the k argmax passes) is a register reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .routing_spec import RoutingSpec, SteeringView

MAX_EXPERTS = 4096  # the tile is held in registers; beyond this it would spill


@triton.jit
def _route_kernel(
    logits_ptr, steer_ptr, bias_ptr, mask_ptr, budget_ptr, scale_ptr, ids_ptr, weights_ptr,
    num_tokens, num_experts, layer, stride_lt,
    stride_bp, stride_bl, stride_mp, stride_ml,
    norm_scale, norm_c,
    ROUTER: tl.constexpr, EXCLUDE_FILL: tl.constexpr, RENORMALIZE: tl.constexpr,
    SCALE_IN_MEMORY: tl.constexpr, STEERED: tl.constexpr, BUDGETED: tl.constexpr,
    TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT] token ids
    cols = tl.arange(0, BLOCK_E)  # [BE] expert ids
    row_ok = rows < num_tokens
    col_ok = cols < num_experts
    ok = row_ok[:, None] & col_ok[None, :]  # [BT, BE]

    z = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_lt + cols[None, :], mask=ok, other=0.0)
    z = z.to(tl.float32)  # [BT, BE]
    if STEERED:
        profile = tl.load(steer_ptr + rows, mask=row_ok, other=0).to(tl.int64)  # [BT]
        bias = tl.load(bias_ptr + profile[:, None] * stride_bp + layer * stride_bl + cols[None, :], mask=ok,
                       other=0.0)
        mask = tl.load(mask_ptr + profile[:, None] * stride_mp + layer * stride_ml + cols[None, :], mask=ok, other=0)
        include = (mask == 1) & ok
        exclude = (mask == -1) & ok

        # MASCing: sigma is the population std of THIS token's raw logits (padding lanes are 0).
        mean = tl.sum(z, axis=1) / num_experts  # [BT]
        centred = tl.where(ok, z - mean[:, None], 0.0)
        sigma = tl.sqrt(tl.sum(centred * centred, axis=1) / num_experts)  # [BT]
        z = z + sigma[:, None] * bias

        # SteerMoE: includes are lifted to the highest non-excluded steered logit.
        ceiling = tl.max(tl.where(ok & (~exclude), z, float("-inf")), axis=1)  # [BT]
        z = tl.where(include, ceiling[:, None], z)
    else:
        include = cols[None, :] < 0  # all False: nothing included or excluded
        exclude = include

    z = tl.where(exclude, EXCLUDE_FILL, z)  # removed from the score function (routing_spec.ROUTER_KINDS)
    if ROUTER == 0:  # norm: padding lanes are 0, so they add nothing to the L2 norm
        z = tl.where(ok, z, 0.0)
        l2 = tl.sqrt(tl.sum(z * z, axis=1))  # [BT]
        if SCALE_IN_MEMORY:
            scale = tl.load(scale_ptr).to(tl.float32) * norm_c
        else:
            scale = norm_scale  # host folded sigma_r * c, as the reference does in Python
        scores = scale * tl.maximum(z / (l2[:, None] + 1e-8), 0.0)
    elif ROUTER == 1:  # softmax: padding lanes are -inf, so they add nothing to the sum
        z = tl.where(ok, z, float("-inf"))
        top = tl.max(z, axis=1)  # [BT]
        top = tl.where(top == float("-inf"), 0.0, top)  # all-excluded rows: no inf - inf
        num = tl.exp(z - top[:, None])
        total = tl.where(row_ok, tl.sum(num, axis=1), 1.0)  # rows past T would divide 0 by 0
        scores = num / total[:, None]
    else:  # sigmoid
        scores = 1.0 / (1.0 + tl.exp(-z))

    key = tl.where(include, float("inf"), tl.where(exclude, float("-inf"), scores))
    # k argmax passes; `taken` rather than overwriting the key, so -inf (excluded)
    # experts still come out in id order when k exceeds the non-excluded count.
    taken = ~ok
    kcols = tl.arange(0, BLOCK_K)  # [BK]
    out_ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    out_w = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        cand = tl.where(taken, float("-inf"), key)
        best = tl.max(cand, axis=1)  # [BT]
        hit = (~taken) & (cand == best[:, None])
        pick = tl.min(tl.where(hit, cols[None, :], BLOCK_E), axis=1)  # [BT] lowest id among ties
        chosen = cols[None, :] == pick[:, None]  # [BT, BE]
        weight = tl.sum(tl.where(chosen, scores, 0.0), axis=1)  # [BT]
        taken = taken | chosen
        out_ids = tl.where(kcols[None, :] == j, pick[:, None], out_ids)
        out_w = tl.where(kcols[None, :] == j, weight[:, None], out_w)
    if BUDGETED:  # slots past the token's budget: the dropped id E, gate 0
        budget = tl.load(budget_ptr + rows, mask=row_ok, other=TOP_K)  # [BT]
        dropped = kcols[None, :] >= budget[:, None]
        out_ids = tl.where(dropped, num_experts, out_ids)
        out_w = tl.where(dropped, 0.0, out_w)
    if RENORMALIZE:
        out_w = out_w / tl.maximum(tl.sum(out_w, axis=1), 1e-20)[:, None]

    out_off = rows[:, None].to(tl.int64) * TOP_K + kcols[None, :]
    out_ok = row_ok[:, None] & (kcols[None, :] < TOP_K)
    tl.store(ids_ptr + out_off, out_ids, mask=out_ok)
    tl.store(weights_ptr + out_off, out_w, mask=out_ok)


def fused_route(
    logits: torch.Tensor,
    steering: SteeringView | None,
    layer: int,
    spec: RoutingSpec,
    scale: float | torch.Tensor = 1.0,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `route_with_table`: returns (topk_ids [T, k] int32, topk_weights [T, k] fp32).

    logits [T, E] fp32/bf16/fp16 (row stride free, unit column stride); steering: the
    step's rows (index [T] int32, bias [P+1, L, E] fp32, mask [P+1, L, E] int8) or None;
    scale: the router's learned scale (a device tensor is read on the device: no host
    sync). `out` lets callers pass preallocated (ids, weights) buffers.
    """
    top_k, kind = spec.top_k, spec.kind
    assert logits.dim() == 2 and logits.stride(1) == 1, "logits must be [T, E] with unit column stride"
    assert logits.dtype in (torch.float32, torch.bfloat16, torch.float16), logits.dtype
    num_tokens, num_experts = logits.shape
    assert 1 <= num_experts <= MAX_EXPERTS, f"E={num_experts} outside 1..{MAX_EXPERTS}"
    assert 1 <= top_k <= num_experts, f"top_k={top_k} must be in 1..E={num_experts}"
    if steering is not None:
        index, bias_table, mask_table = steering.index, steering.bias, steering.mask
        assert index.shape == (num_tokens,) and index.dtype == torch.int32 and index.is_contiguous()
        for name, table, dtype in (("bias", bias_table, torch.float32), ("mask", mask_table, torch.int8)):
            assert table.dim() == 3 and table.shape[2] == num_experts, f"{name} must be [P+1, L, E]: {tuple(table.shape)}"
            assert table.dtype == dtype and table.stride(2) == 1, f"{name}: {dtype} with unit expert stride"
            assert table.device == logits.device
        assert bias_table.shape == mask_table.shape
        assert 0 <= layer < bias_table.shape[1], f"layer {layer} outside 0..{bias_table.shape[1] - 1}"
        budget = steering.budget
        if budget is not None:
            assert budget.shape == (num_tokens,) and budget.dtype == torch.int32 and budget.is_contiguous()
    else:  # any tensors will do: the kernel reads none of them
        index, bias_table, mask_table = logits, logits.view(1, *logits.shape), logits.view(1, *logits.shape)
        budget = None

    scale_in_memory = kind.learned_scale and isinstance(scale, torch.Tensor)
    if scale_in_memory:
        assert scale.numel() == 1 and scale.device == logits.device
        scale_arg, scale_ptr = 0.0, scale.detach()  # read on device: no host sync
    else:
        scale_arg, scale_ptr = (float(scale) * spec.norm_c if kind.learned_scale else 1.0), logits

    if out is None:
        ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=logits.device)
        weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    else:
        ids, weights = out
        assert ids.shape == weights.shape == (num_tokens, top_k) and ids.is_contiguous() and weights.is_contiguous()
        assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    if num_tokens == 0:
        return ids, weights

    block_e = triton.next_power_of_2(num_experts)
    # ~2k live fp32 values per program keeps the tile in registers up to E=512.
    block_t = max(1, min(64, 2048 // block_e, triton.next_power_of_2(num_tokens)))
    grid = (triton.cdiv(num_tokens, block_t),)
    _route_kernel[grid](
        logits, index, bias_table, mask_table, index if budget is None else budget, scale_ptr, ids, weights,
        num_tokens, num_experts, layer, logits.stride(0),
        bias_table.stride(0), bias_table.stride(1), mask_table.stride(0), mask_table.stride(1),
        scale_arg, float(spec.norm_c),
        ROUTER=kind.kernel_id, EXCLUDE_FILL=kind.exclude_fill, RENORMALIZE=spec.renormalize,
        SCALE_IN_MEMORY=scale_in_memory,
        STEERED=steering is not None, BUDGETED=budget is not None, TOP_K=top_k, BLOCK_K=triton.next_power_of_2(top_k),
        BLOCK_T=block_t, BLOCK_E=block_e, num_warps=8 if block_e >= 1024 else 4,
    )
    return ids, weights
