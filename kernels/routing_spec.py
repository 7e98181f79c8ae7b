"""What one routing call is given, as three values: the router kind, the model's routing
constants, and the step's steering rows; and the router kinds of vLLM's own MoE families.

Router kinds of our models, one table (the only place their rules live):

  kind     kernel id  learned scale  renormalise  an excluded expert's logit becomes
  norm     0          yes (sigma)    never        0, before the L2 norm (UniPool's own rule)
  softmax  1          no             if asked     -inf
  sigmoid  2          no             if asked     -inf (score 0)

Router kinds of vLLM's families (their own code selects; FAMILY_ROUTER_KINDS says where
steering reaches it):

  kind                  how vLLM 0.32 scores and selects                        steered on
  softmax               softmax over the experts, top-k (renormalised if asked)  logits
  topk-softmax          top-k of the logits, softmax over the chosen (gpt-oss)   logits
  sparsemixer           Phi-MoE's top-2 sparsemixer                              logits
  grouped-softmax       DeepSeek V1/V2: grouped top-k (V1 has one group)         selection
  grouped-sigmoid       grouped top-k of sigmoid scores                          selection
  grouped-softmax-bias  grouped top-k, selection by score plus a learned         selection
  grouped-sigmoid-bias  correction bias, groups ranked by their top-2 sum        selection
                        (DeepSeek V3's `noaux_tc`)

"logits": the kind selects by logit order, so steering is a transform of the router's
logits (routing_reference.steer_router_logits). "selection": it selects on a score that a
logit cannot veto, so include/exclude act on the selection (routing_reference.grouped_select).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

NORM_EPS = 1e-8


def _norm_scores(z: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    return scale * torch.relu(z / (z.norm(dim=-1, keepdim=True) + NORM_EPS))


def _softmax_scores(z: torch.Tensor, scale: None) -> torch.Tensor:
    return torch.softmax(z, dim=-1)


def _sigmoid_scores(z: torch.Tensor, scale: None) -> torch.Tensor:
    return torch.sigmoid(z)


@dataclass(frozen=True)
class RouterKind:
    name: str
    kernel_id: int  # the Triton routing kernel's ROUTER constant
    learned_scale: bool  # a learned scalar multiplies the scores (NormRouter's sigma, `norm_scale`)
    may_renormalize: bool  # gates may be divided by their sum (norm_topk_prob)
    exclude_fill: float  # an excluded expert's logit, before scoring
    score_fn: Callable[[torch.Tensor, float | torch.Tensor], torch.Tensor]  # (z [T, E], scale) -> [T, E]

    def scores(self, z: torch.Tensor, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """Scores [T, E] from (steered, masked) logits z [T, E]; differentiable (training uses it).

        `scale` is NormRouter's sigma * c; the other kinds have none.
        """
        return self.score_fn(z, scale)


ROUTER_KINDS: dict[str, RouterKind] = {k.name: k for k in (
    RouterKind("norm", 0, learned_scale=True, may_renormalize=False, exclude_fill=0.0, score_fn=_norm_scores),
    RouterKind("softmax", 1, learned_scale=False, may_renormalize=True, exclude_fill=-math.inf,
               score_fn=_softmax_scores),
    RouterKind("sigmoid", 2, learned_scale=False, may_renormalize=True, exclude_fill=-math.inf,
               score_fn=_sigmoid_scores),
)}


@dataclass(frozen=True)
class FamilyRouterKind:
    """A vLLM family's router kind (see the module doc)."""

    name: str
    steered_on: str  # "logits" (steer_router_logits) or "selection" (grouped_select)

    @property
    def grouped(self) -> bool:
        return self.steered_on == "selection"


FAMILY_ROUTER_KINDS: dict[str, FamilyRouterKind] = {k.name: k for k in (
    FamilyRouterKind("softmax", "logits"),
    FamilyRouterKind("topk-softmax", "logits"),
    FamilyRouterKind("sparsemixer", "logits"),
    FamilyRouterKind("grouped-softmax", "selection"),
    FamilyRouterKind("grouped-sigmoid", "selection"),
    FamilyRouterKind("grouped-softmax-bias", "selection"),
    FamilyRouterKind("grouped-sigmoid-bias", "selection"),
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


# A routing function, the one signature of routing_reference.route_with_table and the Triton
# routing.fused_route: (logits [T, E], steering or None, layer, spec, scale) ->
# (topk_ids [T, k] int32, topk_weights [T, k] fp32).
RouteFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class SteeringView(NamedTuple):
    """The step's steering, as the routers read it.

    index [T] int32 (the token's row; 0 = none); bias [P+1, L, E] fp32 (alpha folded in);
    mask [P+1, L, E] int8 (+1 include, -1 exclude); row 0 of both is all zeros;
    budget [T] int32 or None: experts each token may use, 0..k (its expert budget; k =
    no budget). Slots past a token's budget come out with id E (the pool kernels' "dropped"
    id: never computed) and weight 0.
    """

    index: torch.Tensor
    bias: torch.Tensor
    mask: torch.Tensor
    budget: torch.Tensor | None = None
