"""`SteeringTable`: one model's steering rows in the engine, and the step's per-token row index.

All buffers are allocated once, when the model is built, and only ever updated in place:
compiled graphs (and CUDA graphs) keep their addresses, and a step whose index slice is
all zero routes exactly as an unsteered model.

  index  [max_tokens]     int32  row of each token of the current step (0 = none)
  bias   [P_max+1, L, E]  fp32   MASCing bias rows, alpha folded in (row 0 = zeros)
  mask   [P_max+1, L, E]  int8   SteerMoE rows, +1 include / -1 exclude (row 0 = zeros)
  routed_scale [P_max+1]  fp32   what multiplies the routed gates: 0 for a profile with a
                                 routed budget of zero (shared experts only), else 1 (row 0 = 1)

The table also records which profile content each row holds (`digests`, see
contract.digest), so a request admitted with a row that has since been rewritten is never
steered with another profile's content. Whoever fills the index must write (at least) the
first num_tokens entries every step: the buffer persists between steps and warm-up runs.
Nothing here is specific to one model family: any MoE model's routers can read a table.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from unipool_serve.kernels.routing_spec import SteeringView


def expand_rows(rows: np.ndarray, query_start_loc: np.ndarray) -> np.ndarray:
    """Per-request rows [R] -> per-token rows [N]: request r's row for each of its tokens.

    query_start_loc [R + 1] holds the first token of each request in the step, and N =
    query_start_loc[R] (vLLM's layout: a request's scheduled tokens are contiguous).
    """
    return np.repeat(np.asarray(rows, dtype=np.int32), np.diff(query_start_loc[: len(rows) + 1]))


class SteeringTable(nn.Module):
    """Persistent steering buffers read by every router of one model (see the module doc)."""

    def __init__(self, max_tokens: int, num_layers: int, num_experts: int, max_profiles: int,
                 enabled: bool = True):
        super().__init__()
        self.enabled = enabled  # False: routers never read the tables (fixed when the model is built)
        self.max_profiles = max_profiles
        self.register_buffer("index", torch.zeros(max_tokens, dtype=torch.int32), persistent=False)
        shape = (max_profiles + 1, num_layers, num_experts)
        self.register_buffer("bias", torch.zeros(shape, dtype=torch.float32), persistent=False)
        self.register_buffer("mask", torch.zeros(shape, dtype=torch.int8), persistent=False)
        self.register_buffer("routed_scale", torch.ones(max_profiles + 1, dtype=torch.float32), persistent=False)
        self.digests: dict[int, str] = {}  # row -> digest of the profile it holds

    def view(self, num_tokens: int) -> SteeringView | None:
        """What the routers of this step read (None when steering is built off)."""
        if not self.enabled:
            return None
        return SteeringView(self.index[:num_tokens], self.bias, self.mask, self.routed_scale)

    # ---- rows (written by the worker's RPCs) ----------------------------------
    def _check_slot(self, slot: int) -> None:
        if not 1 <= slot <= self.max_profiles:
            raise ValueError(f"steering row {slot} outside 1..{self.max_profiles}")

    def set_row(self, slot: int, bias, mask, row_digest: str, routed_scale: float = 1.0) -> None:
        self._check_slot(slot)
        self.bias[slot].copy_(torch.as_tensor(bias, dtype=torch.float32))
        self.mask[slot].copy_(torch.as_tensor(mask, dtype=torch.int8))
        self.routed_scale[slot] = float(routed_scale)
        self.digests[slot] = row_digest

    def clear_row(self, slot: int) -> None:
        self._check_slot(slot)
        self.bias[slot].zero_()
        self.mask[slot].zero_()
        self.routed_scale[slot] = 1.0
        self.digests.pop(slot, None)

    def holds(self, slot: int, row_digest: str) -> bool:
        return self.digests.get(slot) == row_digest

    # ---- the step's index ---------------------------------------------------
    def fill_index(self, num_tokens: int, per_token: np.ndarray | None) -> None:
        """Zero the step's first num_tokens entries (padding, stale rows), then write per_token."""
        self.index[:num_tokens].zero_()
        if per_token is not None and per_token.size:
            self.index[: per_token.shape[0]].copy_(torch.from_numpy(per_token))
