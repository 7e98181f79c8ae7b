"""`RoutingCounts`: token-slots routed per layer and expert, accumulated on the device.

One `index_add_` per layer per step, in place, no host sync; read by the server's metrics
through the worker's routing-statistics RPC. The counts cover the tokens the model computed
in real steps (prefix-cache hits are never computed); warm-up and dummy runs are counted
too, and the server subtracts a baseline taken before it serves. Off with
UNIPOOL_ROUTING_STATS=0 (fixed when the model is built: compiled graphs specialise on it).
"""

from __future__ import annotations

import torch
from torch import nn


class RoutingCounts(nn.Module):
    def __init__(self, num_layers: int, num_experts: int, enabled: bool = True):
        super().__init__()
        self.enabled = enabled
        # One column more than experts: dropped slots (id E, an expert budget) land there, so
        # recording needs no data-dependent filtering.
        self.register_buffer("slots", torch.zeros(num_layers, num_experts + 1, dtype=torch.int64), persistent=False)

    @property
    def counts(self) -> torch.Tensor:
        """[L, E] token-slots routed to each expert (dropped slots not counted)."""
        return self.slots[:, :-1]

    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Add one layer's choices of this step ([T, k] expert ids, E = dropped) to the counts."""
        if self.enabled:
            flat = topk_ids.reshape(-1).long()  # [T*k]
            self.slots[layer].index_add_(0, flat, torch.ones_like(flat))
