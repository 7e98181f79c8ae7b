"""What one routing call is given, as three values: the router kind, the model's routing
constants, and the step's steering rows.

Router kinds, one table (the only place their rules live):

  kind     kernel id  learned scale  renormalise  an excluded expert's logit becomes
  norm     0          yes (sigma)    never        0, before the L2 norm (UniPool's own rule)
  softmax  1          no             if asked     -inf
  sigmoid  2          no             if asked     -inf (score 0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

NORM_EPS = 1e-8


@dataclass(frozen=True)
class RouterKind:
    name: str
    kernel_id: int  # the Triton routing kernel's ROUTER constant
    learned_scale: bool  # a learned scalar multiplies the scores (NormRouter's sigma, `norm_scale`)
    may_renormalize: bool  # gates may be divided by their sum (norm_topk_prob)
    exclude_fill: float  # an excluded expert's logit, before scoring

    def scores(self, z: torch.Tensor, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """Scores [T, E] from (steered, masked) logits z [T, E]; differentiable (training uses it).

        `scale` is NormRouter's sigma * c; the other kinds have none.
        """
        if self.name == "norm":
            return scale * torch.relu(z / (z.norm(dim=-1, keepdim=True) + NORM_EPS))
        if self.name == "softmax":
            return torch.softmax(z, dim=-1)
        return torch.sigmoid(z)


ROUTER_KINDS: dict[str, RouterKind] = {k.name: k for k in (
    RouterKind("norm", 0, learned_scale=True, may_renormalize=False, exclude_fill=0.0),
    RouterKind("softmax", 1, learned_scale=False, may_renormalize=True, exclude_fill=-math.inf),
    RouterKind("sigmoid", 2, learned_scale=False, may_renormalize=True, exclude_fill=-math.inf),
)}


def router_kind(name: str) -> RouterKind:
    if name not in ROUTER_KINDS:
        raise ValueError(f"unknown router kind {name!r}; expected one of {list(ROUTER_KINDS)}")
    return ROUTER_KINDS[name]


@dataclass(frozen=True)
class RoutingSpec:
    """A model's routing constants, fixed when it is built."""

    kind: RouterKind
    top_k: int
    renormalize: bool = False  # honoured only where kind.may_renormalize
    norm_c: float = 1.0  # NormRouter's constant c (1 for the other kinds)

    def score_scale(self, scale: float | torch.Tensor = 1.0) -> float | torch.Tensor:
        """What multiplies the scores: the router's learned scale times c, or 1."""
        return scale * self.norm_c if self.kind.learned_scale else 1.0

    @classmethod
    def of(cls, kind: str, top_k: int, *, renormalize: bool = False, norm_c: float = 1.0) -> RoutingSpec:
        return cls(router_kind(kind), top_k, renormalize and router_kind(kind).may_renormalize, norm_c)


class SteeringView(NamedTuple):
    """The step's steering rows, as the routers read them.

    index [T] int32 (the token's row; 0 = none); bias [P+1, L, E] fp32 (alpha folded in);
    mask [P+1, L, E] int8 (+1 include, -1 exclude); row 0 of both is all zeros.
    routed_scale [P+1] fp32: what multiplies the routed experts' gates (0 = a routed budget of
    zero: the request runs on the shared experts alone; row 0 = 1). None where a model's
    routing does not read it.
    """

    index: torch.Tensor
    bias: torch.Tensor
    mask: torch.Tensor
    routed_scale: torch.Tensor | None = None
