"""Pool MoE through torch._grouped_mm: the library baseline the fused kernel is compared with.

Slots sorted by expert, one grouped GEMM per projection, weights applied in fp32,
scatter-added per token. No host sync, so it can be captured in a CUDA graph.
Dropped slots (id E) are not supported here: the benchmarks never drop.
"""

from __future__ import annotations


def grouped_mm_moe(torch, hidden, w_gate_up, w_down, topk_ids, topk_weights):
    num_tokens, top_k = topk_ids.shape
    flat = topk_ids.reshape(-1).long()  # [S]
    order = torch.argsort(flat, stable=True)  # [S]
    counts = torch.zeros(w_gate_up.shape[0], dtype=torch.int64, device=hidden.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    offs = torch.cumsum(counts, 0).to(torch.int32)  # [E] group ends
    x = hidden[order // top_k]  # [S, H]
    gate_up = torch._grouped_mm(x, w_gate_up.transpose(1, 2), offs=offs)  # [S, 2F]
    gate, up = gate_up.chunk(2, dim=-1)
    y = torch._grouped_mm(torch.nn.functional.silu(gate) * up, w_down.transpose(1, 2), offs=offs)  # [S, H]
    y = y.float() * topk_weights.reshape(-1)[order].unsqueeze(1)
    out = torch.zeros(num_tokens, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    out.index_add_(0, order // top_k, y)
    return out.to(hidden.dtype)
