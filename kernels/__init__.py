"""Kernels for shared-pool MoE serving: torch references and their Triton versions.

- route / route_with_table, pool_moe: plain torch, the semantics and the fallback.
- fused_route, fused_pool_moe: Triton (imported on first access, so importing this
  package never imports triton).
- dispatch_route_with_table, dispatch_pool_moe: Triton on CUDA tensors, the torch
  reference elsewhere (or everywhere with UNIPOOL_KERNELS=torch).
"""

from .dispatch import dispatch_pool_moe, dispatch_route_with_table
from .moe_reference import pool_moe
from .routing_reference import route, route_with_table

__all__ = [
    "dispatch_pool_moe",
    "dispatch_route_with_table",
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
