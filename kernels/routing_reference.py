"""Routing semantics, in plain torch: the ground truth for every routing path.

Shapes: T tokens, E experts in the layer's pool, k experts chosen per token.

Steps, for each token (docs/steering.md restates them for profile authors):

1. Steering bias (MASCing): z' = z + sigma_t * b_t, where z is the raw router
   logit row [E] (fp32), b_t the token's bias row (profile alpha already folded
   in) and sigma_t the population standard deviation (correction 0) of THAT
   token's raw logits, so a token's steering never depends on other tokens.
2. Hard masks (SteerMoE): m_t in {+1 include, 0, -1 exclude}.
   - included experts' logits are lifted to the token's maximum steered logit
     (over non-excluded experts) and always selected first;
   - excluded experts are removed from the score function (softmax: -inf;
     sigmoid: score 0; norm: logit zeroed BEFORE the L2 norm, as UniPool's
     NormRouter masks, so the norm cannot overflow) and never selected.
3. Scores s from the steered logits by router type:
   - norm:    s = sigma_r * c * relu(z / (||z||_2 + 1e-8))   (no softmax)
   - softmax: s = softmax(z)
   - sigmoid: s = sigmoid(z)
4. Selection: top-k over s with includes first and excludes last; ties go to the
   lower expert id (stable sort), so every implementation agrees.
5. Budget (optional, per token): only the first k'_t of the k choices are kept; the
   others become id E ("dropped": the pool kernels never compute them) with gate 0.
6. Gates: s at the kept experts; divided by their sum when `renormalize`
   (softmax/sigmoid only; NormRouter gates are the raw scores, budget or not).

The per-kind rules (score function, learned scale, renormalisation, how an excluded
expert is removed) live in routing_spec.ROUTER_KINDS.
"""

from __future__ import annotations

import torch

from .routing_spec import RoutingSpec, SteeringView

INCLUDE, EXCLUDE = 1, -1


def steer_logits(logits: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """MASCing's additive rule with per-token sigma. logits, bias: [T, E] fp32."""
    if bias is None:
        return logits
    sigma = logits.std(dim=-1, correction=0, keepdim=True)  # [T, 1]
    return logits + sigma * bias


def route(
    logits: torch.Tensor,
    spec: RoutingSpec,
    scale: float | torch.Tensor = 1.0,
    *,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    budget: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route T tokens over a pool of E experts.

    logits: [T, E] raw router logits (any float dtype; computed in fp32).
    scale:  the router's learned scale (NormRouter's sigma; ignored by the other kinds).
    bias:   [T, E] per-token steering bias (alpha folded in) or None.
    mask:   [T, E] int8 (+1 include, -1 exclude, 0 free) or None.
    budget: [T] int, experts each token keeps (0..k), or None (all k).
    Returns (topk_ids [T, k] int32, topk_weights [T, k] fp32); dropped slots hold id E.
    """
    kind = spec.kind
    z = steer_logits(logits.float(), None if bias is None else bias.float())
    include = exclude = None
    if mask is not None:
        include, exclude = mask == INCLUDE, mask == EXCLUDE
        ceiling = z.masked_fill(exclude, float("-inf")).amax(dim=-1, keepdim=True)
        z = torch.where(include, ceiling, z)
        z = z.masked_fill(exclude, kind.exclude_fill)  # removed from the score function
    scores = kind.scores(z, spec.score_scale(scale))

    key = scores
    if mask is not None:
        key = key.masked_fill(include, float("inf")).masked_fill(exclude, float("-inf"))
    order = top_k_lowest_id_first(key, spec.top_k)  # [T, k]
    weights = scores.gather(-1, order)
    if budget is not None:
        dropped = torch.arange(spec.top_k, device=order.device) >= budget.to(order.device).view(-1, 1)  # [T, k]
        order = order.masked_fill(dropped, logits.shape[-1])
        weights = weights.masked_fill(dropped, 0.0)
    if spec.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return order.to(torch.int32), weights


def top_k_lowest_id_first(key: torch.Tensor, k: int) -> torch.Tensor:
    """[T, E] -> [T, k]: the ids of a stable descending sort's first k (ties to the lower id), as k
    argmax passes: torch.argmax returns the first maximum, and a taken id is set below every
    value left (a -inf key, an excluded expert, first becomes the dtype's lowest finite value).
    For the small k of a router, k fused reductions where a compiled step ran a whole sort per layer."""
    key = key.masked_fill(key == float("-inf"), torch.finfo(key.dtype).min)
    picks = []
    for _ in range(k):
        pick = key.argmax(dim=-1, keepdim=True)  # [T, 1]
        picks.append(pick)
        key = key.scatter(-1, pick, float("-inf"))
    return torch.cat(picks, dim=-1)


def route_with_table(
    logits: torch.Tensor,
    steering: SteeringView | None,
    layer: int,
    spec: RoutingSpec,
    scale: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`route` with each token's steering row gathered from the engine's tables (None: unsteered)."""
    if steering is None:
        return route(logits, spec, scale)
    rows = steering.index.long()
    return route(logits, spec, scale, bias=steering.bias[rows, layer], mask=steering.mask[rows, layer],
                 budget=steering.budget)


# ---- routers that are not ours (vLLM's model families) -----------------------------------
# Their own code selects the experts; steering reaches them in one of two places.


def steer_router_logits(logits: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
    """Steps 1-2 as a pure transform of a router's logits [T, E], for routers that select by logit
    order (softmax top-k, top-k then softmax, sparsemixer): returns logits of the same dtype.

    Included experts go JUST ABOVE the token's maximum steered logit over the non-excluded
    experts (the next representable value of the logits' dtype), so a top-k that does not
    know about them still ranks them first (SteerMoE's rule); excluded experts get -inf. A
    zero bias row and an empty mask row return the logits unchanged, bit for bit.
    """
    z = steer_logits(logits.float(), None if bias is None else bias.float()).to(logits.dtype)
    if mask is None:
        return z
    include, exclude = mask == INCLUDE, mask == EXCLUDE
    ceiling = z.masked_fill(exclude, float("-inf")).amax(dim=-1, keepdim=True)
    lifted = torch.nextafter(ceiling, torch.full_like(ceiling, float("inf")))
    return torch.where(include, lifted, z).masked_fill(exclude, float("-inf"))


def grouped_select(
    logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    top_k: int,
    num_groups: int,
    topk_groups: int,
    scoring: str,
    correction_bias: torch.Tensor | None = None,
    renormalize: bool = False,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-5 on the SELECTION score, for grouped top-k routers (DeepSeek V2/V3), where a
    logit of -inf does not keep an expert out (sigmoid gives it score 0, the correction bias
    may still rank it first, and a chosen group may hold fewer than k usable experts).

    logits: [T, E] already steered by steer_router_logits (includes lifted, excludes -inf).
    key = score (+ correction bias). Groups are ranked as the model ranks them (sum of the
    top-2 keys with a correction bias, else the max key), over non-excluded experts only;
    groups holding an included expert come first. The k experts are then: included experts,
    then the best keys inside the chosen groups, then (only if those groups run out of
    non-excluded experts) the best keys outside them; excluded experts never. Gates are the
    scores of the chosen experts (renormalised if asked) times `scaling`.
    Returns (weights [T, k] fp32, ids [T, k] int64).
    """
    z = logits.float()
    scores = torch.softmax(z, dim=-1) if scoring == "softmax" else torch.sigmoid(z)
    key = scores if correction_bias is None else scores + correction_bias.float()
    include, exclude = mask == INCLUDE, mask == EXCLUDE
    T, E = key.shape
    grouped = key.masked_fill(exclude, float("-inf")).view(T, num_groups, E // num_groups)
    if correction_bias is not None:
        group_scores = grouped.topk(min(2, E // num_groups), dim=-1).values.sum(dim=-1)
    else:
        group_scores = grouped.amax(dim=-1)
    has_include = include.view(T, num_groups, -1).any(dim=-1)
    group_scores = group_scores.masked_fill(has_include, float("inf"))
    chosen = torch.zeros_like(group_scores, dtype=torch.bool)
    chosen.scatter_(1, torch.sort(group_scores, dim=-1, descending=True, stable=True).indices[:, :topk_groups], True)
    in_group = chosen.repeat_interleave(E // num_groups, dim=1)
    # tiers: 3 included, 2 inside the chosen groups, 1 outside them, 0 excluded; within a tier by key
    tier = torch.where(include, 3, torch.where(exclude, 0, torch.where(in_group, 2, 1)))
    by_key = torch.sort(key, dim=-1, descending=True, stable=True).indices
    by_tier = torch.sort(tier.gather(1, by_key), dim=-1, descending=True, stable=True).indices
    ids = by_key.gather(1, by_tier)[:, :top_k]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return weights * scaling, ids
