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
5. Gates: s at the chosen experts; divided by their sum when `renormalize`
   (softmax/sigmoid only; NormRouter gates are the raw scores).
"""

from __future__ import annotations

import torch

NORM_EPS = 1e-8
INCLUDE, EXCLUDE = 1, -1


def steer_logits(logits: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """MASCing's additive rule with per-token sigma. logits, bias: [T, E] fp32."""
    if bias is None:
        return logits
    sigma = logits.std(dim=-1, correction=0, keepdim=True)  # [T, 1]
    return logits + sigma * bias


def router_scores(
    z: torch.Tensor, router_type: str, *, norm_scale: float | torch.Tensor = 1.0, norm_c: float = 1.0
) -> torch.Tensor:
    """Scores [T, E] from (steered, masked) logits z [T, E]; differentiable (training uses it)."""
    if router_type == "norm":
        return norm_scale * norm_c * torch.relu(z / (z.norm(dim=-1, keepdim=True) + NORM_EPS))
    if router_type == "softmax":
        return torch.softmax(z, dim=-1)
    if router_type == "sigmoid":
        return torch.sigmoid(z)
    raise ValueError(f"unknown router_type {router_type!r}; expected norm, softmax or sigmoid")


def route(
    logits: torch.Tensor,
    top_k: int,
    router_type: str,
    *,
    renormalize: bool = False,
    norm_scale: float | torch.Tensor = 1.0,
    norm_c: float = 1.0,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route T tokens over a pool of E experts.

    logits: [T, E] raw router logits (any float dtype; computed in fp32).
    bias:   [T, E] per-token steering bias (alpha folded in) or None.
    mask:   [T, E] int8 (+1 include, -1 exclude, 0 free) or None.
    Returns (topk_ids [T, k] int32, topk_weights [T, k] fp32).
    """
    z = steer_logits(logits.float(), None if bias is None else bias.float())
    include = exclude = None
    if mask is not None:
        include, exclude = mask == INCLUDE, mask == EXCLUDE
        ceiling = z.masked_fill(exclude, float("-inf")).amax(dim=-1, keepdim=True)
        z = torch.where(include, ceiling, z)

    if exclude is not None:
        # Removing an expert from the score function: zero BEFORE the L2 norm for
        # NormRouter (so the norm cannot overflow), -inf for softmax and sigmoid.
        z = z.masked_fill(exclude, 0.0 if router_type == "norm" else float("-inf"))
    scores = router_scores(z, router_type, norm_scale=norm_scale, norm_c=norm_c)

    key = scores
    if mask is not None:
        key = key.masked_fill(include, float("inf")).masked_fill(exclude, float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :top_k]  # [T, k]
    weights = scores.gather(-1, order)
    if renormalize and router_type != "norm":
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return order.to(torch.int32), weights


def route_with_table(
    logits: torch.Tensor,
    steering_index: torch.Tensor,
    bias_table: torch.Tensor,
    mask_table: torch.Tensor,
    layer: int,
    top_k: int,
    router_type: str,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`route` with per-token profile rows gathered from the engine's tables.

    steering_index: [T] int32 (0 = no steering); bias_table: [P+1, L, E] fp32;
    mask_table: [P+1, L, E] int8; row 0 of both tables is all zeros.
    """
    rows = steering_index.long()
    bias = bias_table[rows, layer]  # [T, E]
    mask = mask_table[rows, layer]  # [T, E]
    return route(logits, top_k, router_type, bias=bias, mask=mask, **kwargs)
