"""Pick the Triton kernel or the torch reference per call, by device.

Triton runs only on CUDA tensors here; CPU tensors always take the reference
(the Triton interpreter is for tests, far too slow to serve). UNIPOOL_KERNELS=torch
forces the references everywhere, e.g. to bisect a numerical difference.
"""

from __future__ import annotations

import functools
import os

import torch

from .moe_reference import pool_moe
from .routing_reference import route_with_table

KERNELS_ENV = "UNIPOOL_KERNELS"


@functools.lru_cache(maxsize=None)
def _triton_kernels():
    """(fused_route, fused_pool_moe), or None when triton cannot be imported."""
    try:
        from .fused_moe import fused_pool_moe
        from .routing import fused_route
    except ImportError:
        return None
    return fused_route, fused_pool_moe


def use_triton(device: torch.device) -> bool:
    choice = os.environ.get(KERNELS_ENV, "auto").strip().lower()
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"{KERNELS_ENV}={choice!r}: expected auto, triton or torch")
    if choice == "torch" or device.type != "cuda":
        return False
    if _triton_kernels() is None:
        if choice == "triton":
            raise RuntimeError(f"{KERNELS_ENV}=triton but triton cannot be imported")
        return False
    return True


def dispatch_route_with_table(logits, steering_index, bias_table, mask_table, layer, top_k, router_type, **kwargs):
    """route_with_table's contract; fused_route on CUDA."""
    if use_triton(logits.device):
        fused_route = _triton_kernels()[0]
        return fused_route(logits, steering_index, bias_table, mask_table, layer, top_k, router_type, **kwargs)
    return route_with_table(logits, steering_index, bias_table, mask_table, layer, top_k, router_type, **kwargs)


def dispatch_pool_moe(hidden, w_gate_up, w_down, topk_ids, topk_weights):
    """pool_moe's contract; fused_pool_moe on CUDA."""
    if use_triton(hidden.device):
        return _triton_kernels()[1](hidden, w_gate_up, w_down, topk_ids, topk_weights)
    return pool_moe(hidden, w_gate_up, w_down, topk_ids, topk_weights)
