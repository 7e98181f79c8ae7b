"""`ExpertPool`: one pool's stacked SwiGLU experts, owned once, shared by its layers.

Shapes (per tensor-parallel rank): gate_up [E, 2*Fp, H] (gate rows [0, F_r), up rows
[Fp, Fp + F_r)), down [E, H, Fp]; F_r = F / tp is this rank's slice of the expert
width and Fp >= F_r its padded width (the CPU kernel wants multiples of 32). Padding
rows/columns are zero, so they add exactly nothing: silu(0) * 0 = 0.
"""

from __future__ import annotations

import torch
from torch import nn


class ExpertPool(nn.Module):
    """E experts of width F sharded on F across TP ranks; the MoE backend may repack them."""

    def __init__(self, num_experts: int, hidden_size: int, width: int, *, tp_rank: int, tp_size: int,
                 pad_to: int = 1, dtype: torch.dtype | None = None):
        super().__init__()
        if width % tp_size:
            raise ValueError(
                f"expert_intermediate_size={width} must be divisible by the tensor-parallel size {tp_size}"
            )
        self.num_experts, self.hidden_size, self.width = num_experts, hidden_size, width
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.local_width = width // tp_size
        self.padded_width = -(-self.local_width // pad_to) * pad_to
        # zeros, not empty: the padding must stay zero
        self.gate_up_proj = nn.Parameter(
            torch.zeros(num_experts, 2 * self.padded_width, hidden_size, dtype=dtype), requires_grad=False
        )  # [E, 2Fp, H]
        self.down_proj = nn.Parameter(
            torch.zeros(num_experts, hidden_size, self.padded_width, dtype=dtype), requires_grad=False
        )  # [E, H, Fp]
        self.gate_up_proj.weight_loader = self._load_gate_up
        self.down_proj.weight_loader = self._load_down
        self.packed_by: str | None = None  # backend name once repacked

    def _rank_slice(self) -> slice:
        return slice(self.tp_rank * self.local_width, (self.tp_rank + 1) * self.local_width)

    def _load_gate_up(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        F, Fr, Fp, own = self.width, self.local_width, self.padded_width, self._rank_slice()
        param.data[:, :Fr].copy_(loaded[:, :F][:, own])  # gate rows of this rank
        param.data[:, Fp:Fp + Fr].copy_(loaded[:, F:][:, own])  # up rows of this rank

    def _load_down(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        param.data[:, :, :self.local_width].copy_(loaded[:, :, self._rank_slice()])

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_size}, width={self.width}, "
                f"local_width={self.local_width}, padded_width={self.padded_width}, packed_by={self.packed_by}")
