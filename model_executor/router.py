"""`PoolRouter`: a router over an expert pool, and the one routing entry point of every model here.

A router is owned once by its model (`model.routers.{r}`); PathMoE ties it across a block
of consecutive layers, each of which routes its own hidden state. The vLLM model and the
reference model both route through `PoolRouter.route`; what differs is only the routing
function the router is built with (kernels/routing_reference.route_with_table, or the
Triton fused_route that the vLLM model's MoE backend names on CUDA), and both implement
kernels/routing_reference.py's semantics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unipool_serve.kernels.routing_reference import route_with_table
from unipool_serve.kernels.routing_spec import RouteFn, SteeringView

from .config import UniPoolConfig


class PoolRouter(nn.Module):
    """Router weights [E, H] in fp32 (replicated on every TP rank), plus the kind's learned scale,
    and the routing function it routes with."""

    def __init__(self, config: UniPoolConfig, trainable: bool = False, route_fn: RouteFn = route_with_table):
        super().__init__()
        self.spec = config.routing_spec()
        self.route_fn = route_fn
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, dtype=torch.float32),
                                   requires_grad=trainable)
        self.norm_scale = None  # NormRouter's sigma: [1] fp32
        if self.spec.kind.learned_scale:
            self.norm_scale = nn.Parameter(torch.ones(1, dtype=torch.float32), requires_grad=trainable)

    @property
    def scale(self) -> float | torch.Tensor:
        return 1.0 if self.norm_scale is None else self.norm_scale

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden.float(), self.weight.float())  # [T, E] fp32

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Unsteered scores [T, E] (differentiable: training's balancing loss uses them)."""
        return self.spec.kind.scores(logits, self.spec.score_scale(self.scale))

    def route(self, logits: torch.Tensor, layer: int, steering: SteeringView | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_ids [T, k] int32, topk_weights [T, k] fp32) for one layer's logits [T, E].

        Always the same ops whatever the steering index holds (a data-dependent branch would
        be frozen into a compiled graph): row 0 is all zeros and routes exactly like an
        unsteered router. `steering` None (UNIPOOL_STEERING=0) skips the tables altogether.
        """
        ids, weights = self.route_fn(logits, steering, layer, self.spec, self.scale)
        return ids.to(torch.int32).contiguous(), weights.float().contiguous()
