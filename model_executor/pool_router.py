"""Routers over a shared pool: fp32 logits z = W_r h, then route_with_table semantics.

A router is owned once by the model (`model.routers.{r}`); PathMoE ties it across
a block of consecutive layers, each of which routes its own hidden state.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from unipool_serve.kernels.routing_reference import route, route_with_table

from .config import UniPoolConfig


class PoolRouter(nn.Module):
    """Router weights [E, H] in fp32 (replicated on every TP rank); NormRouter adds sigma."""

    def __init__(self, config: UniPoolConfig):
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(config.num_experts, config.hidden_size, dtype=torch.float32), requires_grad=False
        )
        self.norm_scale = None
        if config.router_type == "norm":
            self.norm_scale = nn.Parameter(torch.ones(1, dtype=torch.float32), requires_grad=False)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden.float(), self.weight)  # [T, E] fp32


@functools.lru_cache(maxsize=1)
def _fused_route():
    """The Triton routing kernel when it is installed, else None."""
    try:
        from unipool_serve.kernels.routing import fused_route
    except ImportError:
        return None
    return fused_route


def route_tokens(
    logits: torch.Tensor,
    steering_index: torch.Tensor,
    bias_table: torch.Tensor,
    mask_table: torch.Tensor,
    layer: int,
    config: UniPoolConfig,
    norm_scale: torch.Tensor | None,
    steerable: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_ids [T, k] int32, topk_weights [T, k] fp32) for one layer's tokens.

    Always the same ops whatever the index holds (a data-dependent branch would be
    frozen into a compiled graph); index 0 gathers the zero rows and routes exactly
    like an unsteered router. `steerable=False` (fixed when the model is built, see
    UNIPOOL_STEERING in steering_state.py) skips the tables altogether.
    """
    kwargs = dict(
        renormalize=config.norm_topk_prob,
        norm_scale=1.0 if norm_scale is None else norm_scale,
        norm_c=config.norm_router_c or 1.0,
    )
    if not steerable:
        ids, weights = route(logits, config.num_experts_per_tok, config.router_type, **kwargs)
        return ids.to(torch.int32).contiguous(), weights.float().contiguous()
    fused = _fused_route() if logits.is_cuda else None
    fn = fused if fused is not None else route_with_table
    ids, weights = fn(
        logits, steering_index, bias_table, mask_table, layer,
        config.num_experts_per_tok, config.router_type, **kwargs,
    )
    return ids.to(torch.int32).contiguous(), weights.float().contiguous()
