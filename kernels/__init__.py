"""Kernels for shared-pool MoE serving: torch references and their Triton versions.

- routing_spec: what a routing call is given (router kinds, routing constants, steering rows).
- route / route_with_table, pool_moe: plain torch, the semantics and the fallback.
- fused_route, fused_pool_moe: Triton (imported on first access, so importing this
  package never imports triton).
Which implementation serves a model is chosen once, by the model's backend
(model_executor/moe_backend.py), not here.
"""

from .moe_reference import pool_moe
from .routing_reference import route, route_with_table
from .routing_spec import ROUTER_KINDS, RouterKind, RoutingSpec, SteeringView

__all__ = [
    "ROUTER_KINDS",
    "RouterKind",
    "RoutingSpec",
    "SteeringView",
    "fused_pool_moe",
    "fused_route",
    "pool_moe",
    "route",
    "route_with_table",
]


def __getattr__(name: str):
    if name == "fused_route":
        from .routing import fused_route

        return fused_route
    if name == "fused_pool_moe":
        from .fused_moe import fused_pool_moe

        return fused_pool_moe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
