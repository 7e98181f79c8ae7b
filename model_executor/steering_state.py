"""The engine-side steering seam: a per-token profile index and the profile tables.

All three tensors are allocated once, when the model is built, and are only ever
updated in place: compiled graphs (and CUDA graphs) keep their addresses, and a
step whose index slice is all zero routes exactly as an unsteered model.

  index       [max_tokens]     int32  profile row per token of the current step (0 = none)
  bias_table  [P_max+1, L, E]  fp32   MASCing bias rows, alpha folded in (row 0 = zeros)
  mask_table  [P_max+1, L, E]  int8   SteerMoE rows, +1 include / -1 exclude (row 0 = zeros)
  routing_counts [L, E]        int64  token-slots routed per layer and pool expert, cumulative
                                      (read by the server's metrics; off with UNIPOOL_ROUTING_STATS=0)

Whoever fills the index for a step must write (at least) the first num_tokens
entries every step: the buffer persists between steps and warm-up runs.
"""

from __future__ import annotations

import os

import torch
from torch import nn

MAX_PROFILES_ENV = "UNIPOOL_MAX_STEERING_PROFILES"
ROUTING_STATS_ENV = "UNIPOOL_ROUTING_STATS"
DEFAULT_MAX_PROFILES = 16
# "0" builds routers that never read the tables (for engines that will never steer,
# and to measure what the seam costs); fixed when the model is built.
STEERING_ENV = "UNIPOOL_STEERING"


def steering_enabled_from_env() -> bool:
    raw = os.environ.get(STEERING_ENV, "1").strip().lower()
    if raw not in ("0", "1", "false", "true", "off", "on"):
        raise ValueError(f"{STEERING_ENV}={raw!r} must be 1/0 (on/off)")
    return raw in ("1", "true", "on")


def max_profiles_from_env() -> int:
    raw = os.environ.get(MAX_PROFILES_ENV, str(DEFAULT_MAX_PROFILES))
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{MAX_PROFILES_ENV}={raw!r} must be an integer >= 0")
    return value


class SteeringState(nn.Module):
    """Persistent steering buffers read by every router of the model (see module doc)."""

    def __init__(self, max_tokens: int, num_layers: int, num_experts: int, max_profiles: int,
                 enabled: bool = True):
        super().__init__()
        self.enabled = enabled  # False: routers ignore the buffers (they still exist)
        self.max_tokens = max_tokens
        self.max_profiles = max_profiles
        self.register_buffer("index", torch.zeros(max_tokens, dtype=torch.int32), persistent=False)
        self.register_buffer(
            "bias_table", torch.zeros(max_profiles + 1, num_layers, num_experts, dtype=torch.float32),
            persistent=False,
        )
        self.register_buffer(
            "mask_table", torch.zeros(max_profiles + 1, num_layers, num_experts, dtype=torch.int8),
            persistent=False,
        )
        # A Python constant, fixed at build time: compiled graphs specialise on it.
        self.count_routing = os.environ.get(ROUTING_STATS_ENV, "1") != "0"
        self.register_buffer("routing_counts", torch.zeros(num_layers, num_experts, dtype=torch.int64),
                             persistent=False)

    def record_routing(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Add this step's choices of one layer to the counts (in place, on the device)."""
        if self.count_routing:
            flat = topk_ids.reshape(-1).long()  # [T*k]
            self.routing_counts[layer].index_add_(0, flat, torch.ones_like(flat))

    def step_index(self, num_tokens: int) -> torch.Tensor:
        """The index slice of the current step's tokens: [num_tokens] int32 (a view)."""
        return self.index[:num_tokens]
