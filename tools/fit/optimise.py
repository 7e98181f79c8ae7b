"""Optimising the steering matrix S against the frozen surrogate, and choosing among the candidates.

    minimise over S [L, E]:  BCE(surrogate(z + sigma_t * S[l]), label 0) + lambda * ||S||_1

on the label-1 training traces (the behaviour to suppress; label-0 traces are already
"0"), Adam (lr 0.05, 100 epochs: MASCing's). S starts at zero rather than at MASCing's
random init, so entries the surrogate never asks for stay where the L1 penalty wants
them. Then entries with |S| <= threshold (0.1) are zeroed, and the strength alpha (the
engine applies alpha * sigma_t * S) is picked on the validation split.

The candidates are of three kinds (expert_selection.py gives the exclusion sets, one per
--exclude-cap): bias only (each S at each alpha), exclusions only (each set), and both
(each S at each alpha with each set). The biases are each lambda's S and the risk-difference
bias (expert_selection.py: SteerMoE's statistic used as a bias, with no surrogate in the
loop; what the demo's hand-made profiles are). One is chosen on the validation split:

- by the surrogate: among the candidates whose mean P(label 1) on the validation label-1
  traces is within SURROGATE_TOLERANCE of the best one's, the weakest: smallest alpha
  (exclusions only count as alpha 0), then fewest excluded experts, then larger lambda (the
  risk-difference bias last; the surrogate alone always prefers more steering, so this
  takes the least that gets nearly all of it);
- by a judge, when given: the lowest share of validation label-1 continuations the judge
  flags, plus any rise in the share it flags among the label-0 continuations over the
  unsteered model's (a profile that pushes the kept behaviour into the suppressed one
  pays for it); ties go the same way (smaller alpha, fewer exclusions, larger lambda).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .surrogate import RoutingSurrogate, batches, pad, probabilities, steer_traces

SURROGATE_TOLERANCE = 0.02


def fit_bias(surrogate: RoutingSurrogate, traces: Sequence[torch.Tensor], *, l1: float, seed: int,
             epochs: int = 100, lr: float = 0.05, batch_size: int = 32, progress: bool = True) -> torch.Tensor:
    """S [L, E] that drives the frozen surrogate towards label 0 on `traces` (label-1 examples)."""
    bias = torch.zeros(traces[0].shape[1], traces[0].shape[2], requires_grad=True)  # [L, E]
    optimiser = torch.optim.Adam([bias], lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(seed)
    for p in surrogate.parameters():
        p.requires_grad_(False)
    # train mode: cuDNN's LSTM backward refuses eval mode; the surrogate has no dropout or
    # batch norm, so both modes compute the same function.
    surrogate.train()
    bar = tqdm(range(epochs), desc=f"optimise S (lambda {l1:g})", unit="epoch", disable=not progress)
    try:
        for _ in bar:
            for idx in batches(len(traces), batch_size, generator):
                optimiser.zero_grad()
                x, lengths = pad([traces[int(i)] for i in idx])
                logit = surrogate(steer_traces(x, bias), lengths)
                loss = loss_fn(logit, torch.zeros_like(logit)) + l1 * bias.abs().sum()
                loss.backward()
                optimiser.step()
            bar.set_postfix(nonzero=int((bias.detach().abs() > 0.1).sum()))
    finally:
        surrogate.eval()
        for p in surrogate.parameters():
            p.requires_grad_(True)
    return bias.detach().clone()


def sparsify(bias: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(bias.abs() > threshold, bias, torch.zeros_like(bias))


@dataclass
class Candidate:
    """A bias (lambda, alpha), an exclusion set (its cap), or both, with its validation scores."""

    l1: float | None  # the lambda of a surrogate-fitted S; None: no such S
    alpha: float  # 0 with no bias
    bias: torch.Tensor  # [L, E] sparse S, unscaled (all zero with no bias)
    mask: torch.Tensor | None = None  # [L, E] int8, +1 include / -1 exclude (expert_selection.py)
    exclude_cap: int | None = None  # the per-layer cap the mask was selected under
    from_risk_difference: bool = False  # the bias is the risk difference's, not a surrogate-fitted S
    surrogate_rate: float = 0.0  # mean P(label 1) of the steered validation label-1 traces
    judge_rate: float | None = None  # share of validation label-1 continuations the judge flags
    judge_rate_0: float | None = None  # ... and of validation label-0 continuations

    @property
    def has_bias(self) -> bool:
        return self.l1 is not None or self.from_risk_difference

    @property
    def bias_source(self) -> str | None:
        """Where the bias comes from: "surrogate" (an S fitted at `l1`), "risk difference", or None."""
        if self.from_risk_difference:
            return "risk difference"
        return None if self.l1 is None else "surrogate"

    @property
    def bias_label(self) -> str | None:
        """The bias as the candidates table names it: "lambda L", "risk difference", or None."""
        if self.from_risk_difference:
            return "risk difference"
        return None if self.l1 is None else f"lambda {self.l1:g}"

    @property
    def kind(self) -> str:
        if self.mask is None:
            return "bias only"
        return "bias + exclusions" if self.has_bias else "exclusions only"

    @property
    def excluded(self) -> int:
        return 0 if self.mask is None else int((self.mask == -1).sum())

    @property
    def included(self) -> int:
        return 0 if self.mask is None else int((self.mask == 1).sum())

    def describe(self) -> str:
        parts = [] if not self.has_bias else [
            f"risk-difference bias, alpha {self.alpha:g}" if self.from_risk_difference
            else f"lambda {self.l1:g}, alpha {self.alpha:g}"]
        if self.mask is not None:
            parts.append(f"{self.excluded} excluded, at most {self.exclude_cap} per layer"
                         + (f", {self.included} included" if self.included else ""))
        return "; ".join(parts)

    def weakest_first(self) -> tuple:
        """Sort key among equally good candidates: the least steering first."""
        return (self.alpha, self.excluded + self.included, -(self.l1 or 0.0))

    def judge_cost(self, unsteered_0: float) -> float:
        return self.judge_rate + max(0.0, self.judge_rate_0 - unsteered_0)

    def as_dict(self) -> dict:
        return {"kind": self.kind, "bias": self.bias_source, "lambda": self.l1, "alpha": self.alpha,
                "exclude_cap": self.exclude_cap,
                "excluded": self.excluded, "included": self.included,
                "surrogate_rate": round(self.surrogate_rate, 4), "judge_rate": self.judge_rate,
                "judge_rate_label_0": self.judge_rate_0}


def make_candidates(biases: dict[float, torch.Tensor], alphas: Sequence[float], masks: dict[int, torch.Tensor],
                    rd_bias: torch.Tensor | None = None) -> list[Candidate]:
    """Bias only (every S, each lambda's and the risk difference's, at every alpha), exclusions only
    (every mask), and both (every pairing)."""
    def with_biases(mask=None, cap=None) -> list[Candidate]:
        out = [Candidate(l1, alpha, bias, mask=mask, exclude_cap=cap) for l1, bias in biases.items() for alpha in alphas]
        if rd_bias is not None:
            out += [Candidate(None, alpha, rd_bias, mask=mask, exclude_cap=cap, from_risk_difference=True)
                    for alpha in alphas]
        return out

    out = with_biases()
    for cap, mask in masks.items():
        out.append(Candidate(None, 0.0, torch.zeros(mask.shape, dtype=torch.float32), mask=mask, exclude_cap=cap))
        out += with_biases(mask, cap)
    return out


def score_candidates(surrogate: RoutingSurrogate, candidates: list[Candidate],
                     val_traces: Sequence[torch.Tensor]) -> list[Candidate]:
    for c in candidates:
        c.surrogate_rate = float(probabilities(surrogate, val_traces, c.alpha * c.bias, mask=c.mask).mean())
    return candidates


def choose_by_surrogate(candidates: Sequence[Candidate]) -> Candidate:
    best = min(c.surrogate_rate for c in candidates)
    near = [c for c in candidates if c.surrogate_rate <= best + SURROGATE_TOLERANCE]
    return min(near, key=Candidate.weakest_first)


def choose_by_judge(candidates: Sequence[Candidate], judged: Callable[[Candidate | None, int], float],
                    progress: bool = True) -> Candidate:
    """`judged(candidate or None for unsteered, label)`: share of that label's validation continuations flagged."""
    unsteered_0 = judged(None, 0)
    for c in tqdm(candidates, desc="judge candidates", unit="candidate", disable=not progress):
        c.judge_rate, c.judge_rate_0 = judged(c, 1), judged(c, 0)
    return min(candidates, key=lambda c: (c.judge_cost(unsteered_0), *c.weakest_first()))
