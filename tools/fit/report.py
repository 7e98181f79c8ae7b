"""The evaluation table of a fitted profile (test split) and the provenance it records.

Rows: unsteered, the fitted profile, random controls of the same sparsity (per layer the
same nonzero values of S on experts drawn at random, the same alpha; three seeds), and any
profile given with --compare. Columns: the share of test examples the surrogate calls
"behaviour" (P > 0.5), for label-1 and label-0 examples, seen on the captured logits
steered as the engine steers them (later layers' inputs are not recomputed: the
surrogate's view, as in the optimisation); and, with a judge, the share of greedy
continuations the judge flags (end to end, through the source).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from unipool_serve.model_executor.steering.profile import SteeringProfile
from .surrogate import RoutingSurrogate, probabilities

RANDOM_SEEDS = (0, 1, 2)


def random_like(bias: torch.Tensor, seed: int) -> torch.Tensor:
    """Per layer, the same values placed on a random permutation of the experts."""
    generator = torch.Generator().manual_seed(seed)
    out = torch.zeros_like(bias)
    for layer in range(bias.shape[0]):
        out[layer, torch.randperm(bias.shape[1], generator=generator)] = bias[layer]
    return out


def random_controls(profile: SteeringProfile) -> list[tuple[str, SteeringProfile]]:
    return [(f"random control, seed {seed}",
             dataclasses.replace(profile, name=f"{profile.name[:48]}.random-{seed}",
                                 bias=random_like(profile.bias, seed), provenance=None))
            for seed in RANDOM_SEEDS]


@dataclass
class Row:
    steering: str
    surrogate_1: float | None  # share of label-1 test examples the surrogate flags (None: has include/exclude)
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
    if profile is not None and bool(profile.mask_rows().any()):
        return None  # the surrogate's view has no form for include/exclude
    bias = None if profile is None else profile.bias_rows()
    return float((probabilities(surrogate, traces, bias) > 0.5).float().mean())


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


def format_table(rows: Sequence[Row], counts: dict[int, int]) -> str:
    judged = any(r.judge_1 is not None for r in rows)
    head = ["steering", f"surrogate, label 1 (n={counts[1]})", f"surrogate, label 0 (n={counts[0]})"]
    if judged:
        head += [f"judge, label 1 (n={counts[1]})", f"judge, label 0 (n={counts[0]})"]
    body = [[r.steering, _pct(r.surrogate_1), _pct(r.surrogate_0)]
            + ([_pct(r.judge_1), _pct(r.judge_0)] if judged else []) for r in rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    fmt = lambda line: "| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, body)])
