"""SteerMoE's expert selection: which experts to exclude (and include), from the labels' routing.

Per layer l and expert i, the share of a label's captured tokens whose top-k selection
holds expert i, on the raw (unsteered) router logits: the model's own choice. Every
router kind's score function is monotone in the logit (kernels/routing_spec.py), so the
top-k of the logits is the top-k of the scores. Tokens are pooled over a label's
examples, as SteerMoE counts them (a long example weighs more than a short one).

    p1[l, i]  label 1 (the behaviour to suppress)
    p0[l, i]  label 0 (the behaviour to keep)
    rd = p1 - p0          SteerMoE's activation risk difference

- exclusions: per layer, the experts with the largest rd, at most `exclude_cap` of them,
  and only those with rd >= min_rd: an expert label 1 uses no more than label 0 is never
  excluded, however high the cap;
- inclusions (SteerMoE also activates the experts of the wanted behaviour): per layer, at
  most `include_cap` (<= top_k) experts with the most negative rd, rd <= -min_rd. An
  included expert takes a slot of every token, so on a top-1 model it decides all routing
  in its layer: off by default.

The result is an [L, E] int8 mask in the engine's encoding (+1 include, -1 exclude).

The same statistic also gives a bias, a candidate beside the surrogate-fitted S with
`--risk-difference-bias`: S = -rd,
divided by its largest magnitude in the layer, entries with |S| <= threshold zeroed. It
lowers the experts label 1 uses more and raises those label 0 uses more, in proportion,
with no surrogate in the loop (the demo's hand-made profiles are made this way from
labelled documents, scripts/train_demo_model.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from unipool_serve.kernels.routing_reference import EXCLUDE, INCLUDE


def selection_rates(traces: Sequence[torch.Tensor], top_k: int) -> torch.Tensor:
    """[L, E]: share of the traces' tokens whose top-k picks each expert, per layer."""
    layers, experts = traces[0].shape[1:]
    counts = torch.zeros(layers, experts, dtype=torch.float64)
    tokens = 0
    for trace in traces:  # [T, L, E]
        picked = trace.float().topk(top_k, dim=-1).indices  # [T, L, k]
        counts.scatter_add_(1, picked.permute(1, 0, 2).reshape(layers, -1),
                            torch.ones(layers, picked.shape[0] * top_k, dtype=torch.float64))
        tokens += trace.shape[0]
    return (counts / max(tokens, 1)).float()


def risk_difference(traces_1: Sequence[torch.Tensor], traces_0: Sequence[torch.Tensor], top_k: int) -> torch.Tensor:
    """[L, E] rd = p1 - p0: positive where label 1 (the behaviour to suppress) uses the expert more."""
    return selection_rates(traces_1, top_k) - selection_rates(traces_0, top_k)


def expert_mask(rd: torch.Tensor, *, exclude_cap: int, top_k: int, min_rd: float,
                include_cap: int = 0) -> torch.Tensor:
    """[L, E] int8: per layer, up to `exclude_cap` experts of largest rd >= min_rd excluded, up to
    `include_cap` of most negative rd <= -min_rd included. Never leaves fewer than top_k experts."""
    layers, experts = rd.shape
    exclude_cap = min(exclude_cap, experts - top_k)  # the profile's rule: top_k experts must remain
    include_cap = min(include_cap, top_k)
    mask = torch.zeros(layers, experts, dtype=torch.int8)
    for layer in range(layers):
        order = torch.argsort(rd[layer], descending=True, stable=True)
        chosen = [int(i) for i in order[:exclude_cap] if rd[layer, i] >= min_rd]
        mask[layer, chosen] = EXCLUDE
        wanted = [int(i) for i in order.flip(0)[:include_cap] if rd[layer, i] <= -min_rd]
        mask[layer, wanted] = INCLUDE
    return mask


def mask_sets(mask: torch.Tensor) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """(include, exclude) as a profile holds them: {layer: [expert ids]}, empty layers left out."""
    def sets(value: int) -> dict[int, list[int]]:
        return {layer: ids for layer in range(mask.shape[0])
                if (ids := [int(e) for e in (mask[layer] == value).nonzero().flatten()])}
    return sets(INCLUDE), sets(EXCLUDE)


def risk_difference_bias(rd: torch.Tensor, threshold: float) -> torch.Tensor | None:
    """[L, E] S = -rd scaled to [-1, 1] per layer, |S| <= threshold zeroed; None when nothing is left."""
    scaled = -rd / rd.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    bias = torch.where(scaled.abs() > threshold, scaled, torch.zeros_like(scaled)).float()
    return bias if bias.any() else None
