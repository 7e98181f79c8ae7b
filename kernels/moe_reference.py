"""Pool MoE in plain torch: the reference for the fused kernel and the fallback path.

T tokens, H hidden, F expert width, E experts in the pool, k chosen per token.
Only experts that received a token are computed (a per-expert loop), so its cost
follows the routing just as the fused kernel's does. An id equal to E marks a
dropped slot (e.g. by a per-token expert budget): it contributes nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_moe(
    hidden: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """out[t] = sum_j w[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = ids[t, j].

    hidden [T, H]; w_gate_up [E, 2F, H] (gate rows first, then up); w_down [E, H, F];
    topk_ids [T, k] int in [0, E], E = dropped; topk_weights [T, k] fp32. Returns
    [T, H] in hidden's dtype, accumulated in fp32.
    """
    num_tokens, top_k = topk_ids.shape
    num_experts = w_gate_up.shape[0]
    out = torch.zeros(num_tokens, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    flat_ids = topk_ids.reshape(-1).long()  # [T*k]
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    start = 0
    for expert, count in enumerate(counts[:num_experts]):  # dropped slots (id E) sort last
        if count == 0:
            continue
        slots = order[start:start + count]  # positions in the flattened [T*k] routing
        start += count
        tokens = slots // top_k
        x = hidden[tokens]  # [n, H]
        gate, up = F.linear(x, w_gate_up[expert]).chunk(2, dim=-1)  # [n, F] each
        y = F.linear(F.silu(gate) * up, w_down[expert])  # [n, H]
        weight = topk_weights.reshape(-1)[slots].unsqueeze(-1)  # [n, 1]
        out.index_add_(0, tokens, y.float() * weight)
    return out.to(hidden.dtype)
