"""The evaluation table of a fitted profile (test split) and the provenance it records.

Rows: unsteered, the fitted profile, random controls of the same size (per layer the same
nonzero values of S and the same numbers of excluded and included experts, moved together
by one random permutation of the layer's experts, the same alpha; three seeds), and any
profile given with --compare. Columns: the share of test examples the surrogate calls
"behaviour" (P > 0.5), for label-1 and label-0 examples, seen on the captured logits
steered as the engine steers them, masks in the surrogate's finite form (surrogate.py;
later layers' inputs are not recomputed: the surrogate's view, as in the optimisation);
and, with a judge, the share of greedy continuations the judge flags (end to end,
through the source).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from unipool_serve.model_executor.steering.profile import SteeringProfile
from .expert_selection import mask_sets
from .optimise import Candidate
from .surrogate import RoutingSurrogate, probabilities

RANDOM_SEEDS = (0, 1, 2)


def random_like(bias: torch.Tensor, mask: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, the same bias values and mask entries placed on one random permutation of the experts."""
    generator = torch.Generator().manual_seed(seed)
    out_bias, out_mask = torch.zeros_like(bias), torch.zeros_like(mask)
    for layer in range(bias.shape[0]):
        perm = torch.randperm(bias.shape[1], generator=generator)
        out_bias[layer, perm], out_mask[layer, perm] = bias[layer], mask[layer]
    return out_bias, out_mask


def random_controls(profile: SteeringProfile) -> list[tuple[str, SteeringProfile]]:
    controls = []
    for seed in RANDOM_SEEDS:
        bias, mask = random_like(profile.bias, profile.mask_rows(), seed)
        include, exclude = mask_sets(mask)
        controls.append((f"random control, seed {seed}",
                         dataclasses.replace(profile, name=f"{profile.name[:48]}.random-{seed}", bias=bias,
                                             include=include, exclude=exclude, provenance=None)))
    return controls


@dataclass
class Row:
    steering: str
    surrogate_1: float | None  # share of label-1 test examples the surrogate flags (None: no label-1 examples)
    surrogate_0: float | None
    judge_1: float | None = None  # share of label-1 test continuations the judge flags (None: no judge)
    judge_0: float | None = None

    def as_dict(self) -> dict:
        return {k: (None if v is None else round(v, 4) if isinstance(v, float) else v)
                for k, v in dataclasses.asdict(self).items()}


def surrogate_share(surrogate: RoutingSurrogate, traces: Sequence[torch.Tensor],
                    profile: SteeringProfile | None) -> float | None:
    if not traces:
        return None
    bias, mask = (None, None) if profile is None else (profile.bias_rows(), profile.mask_rows())
    return float((probabilities(surrogate, traces, bias, mask=mask) > 0.5).float().mean())


def evaluate(surrogate, steerings: Sequence[tuple[str, SteeringProfile | None]], traces_1, traces_0,
             judged=None) -> list[Row]:
    """`judged(profile, label)` -> share the judge flags on that label's test prompts, or None."""
    rows = []
    for label, profile in steerings:
        row = Row(label, surrogate_share(surrogate, traces_1, profile), surrogate_share(surrogate, traces_0, profile))
        if judged is not None:
            row.judge_1, row.judge_0 = judged(profile, 1), judged(profile, 0)
        rows.append(row)
    return rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _markdown(head: list[str], body: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    fmt = lambda line: "| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, body)])


def format_table(rows: Sequence[Row], counts: dict[int, int]) -> str:
    judged = any(r.judge_1 is not None for r in rows)
    head = ["steering", f"surrogate, label 1 (n={counts[1]})", f"surrogate, label 0 (n={counts[0]})"]
    if judged:
        head += [f"judge, label 1 (n={counts[1]})", f"judge, label 0 (n={counts[0]})"]
    body = [[r.steering, _pct(r.surrogate_1), _pct(r.surrogate_0)]
            + ([_pct(r.judge_1), _pct(r.judge_0)] if judged else []) for r in rows]
    return _markdown(head, body)


def format_candidates(candidates: Sequence[Candidate], chosen: Candidate) -> str:
    """The validation split's scores of every candidate (bias only, exclusions only, both), the chosen one marked."""
    judged = any(c.judge_rate is not None for c in candidates)
    head = ["", "kind", "bias", "alpha", "excluded", "surrogate P(label 1)"]
    if judged:
        head += ["judge, label 1", "judge, label 0"]
    body = [["*" if c is chosen else "", c.kind, c.bias_label or "-", f"{c.alpha:g}" if c.has_bias else "-",
             f"{c.excluded} (cap {c.exclude_cap})" if c.mask is not None else "0", f"{c.surrogate_rate:.3f}"]
            + ([_pct(c.judge_rate), _pct(c.judge_rate_0)] if judged else []) for c in candidates]
    return _markdown(head, body)
