"""`RoutingCounts`: token-slots routed per layer and expert, accumulated on the device.

One in-place add per layer per step of a one-hot count ([T*k] ids against the E + 1 columns:
a comparison and a sum, which a compiled step fuses; `index_add_` became an index_put with
accumulate there, a sort per layer on the CPU), no host sync; read by the server's metrics
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
        self.register_buffer("columns", torch.arange(num_experts + 1), persistent=False)

    @property
    def counts(self) -> torch.Tensor:
        """[L, E] token-slots routed to each expert (dropped slots not counted)."""
        return self.slots[:, :-1]

    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Add one layer's choices of this step ([T, k] expert ids, E = dropped) to the counts."""
        if self.enabled:
            flat = topk_ids.reshape(-1, 1).long()  # [T*k, 1]
            self.slots[layer].add_((flat == self.columns).sum(dim=0))
