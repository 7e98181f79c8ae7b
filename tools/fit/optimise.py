"""Optimising the steering matrix S against the frozen surrogate, and choosing its strength.

    minimise over S [L, E]:  BCE(surrogate(z + sigma_t * S[l]), label 0) + lambda * ||S||_1

on the label-1 training traces (the behaviour to suppress; label-0 traces are already
"0"), Adam (lr 0.05, 100 epochs: MASCing's). S starts at zero rather than at MASCing's
random init, so entries the surrogate never asks for stay where the L1 penalty wants
them. Then entries with |S| <= threshold (0.1) are zeroed, and the strength alpha (the
engine applies alpha * sigma_t * S) is picked on the validation split:

- by the surrogate: the smallest alpha whose mean P(label 1) on the validation label-1
  traces is within SURROGATE_TOLERANCE of the best alpha's (the surrogate alone always
  prefers more steering, so this takes the weakest alpha that gets nearly all of it);
- by a judge, when given: the lowest share of validation label-1 continuations the judge
  flags, plus any rise in the share it flags among the label-0 continuations over the
  unsteered model's (a profile that pushes the kept behaviour into the suppressed one
  pays for it); ties go to the smaller alpha, then to the larger lambda.
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
    """One (lambda, alpha) with its validation scores."""

    l1: float
    alpha: float
    bias: torch.Tensor  # [L, E] sparse S, unscaled
    surrogate_rate: float = 0.0  # mean P(label 1) of the steered validation label-1 traces
    judge_rate: float | None = None  # share of validation label-1 continuations the judge flags
    judge_rate_0: float | None = None  # ... and of validation label-0 continuations

    def judge_cost(self, unsteered_0: float) -> float:
        return self.judge_rate + max(0.0, self.judge_rate_0 - unsteered_0)


def score_candidates(surrogate: RoutingSurrogate, biases: dict[float, torch.Tensor], alphas: Sequence[float],
                     val_traces: Sequence[torch.Tensor]) -> list[Candidate]:
    out = []
    for l1, bias in biases.items():
        for alpha in alphas:
            rate = float(probabilities(surrogate, val_traces, alpha * bias).mean())
            out.append(Candidate(l1, alpha, bias, surrogate_rate=rate))
    return out


def choose_by_surrogate(candidates: Sequence[Candidate]) -> Candidate:
    best = min(c.surrogate_rate for c in candidates)
    near = [c for c in candidates if c.surrogate_rate <= best + SURROGATE_TOLERANCE]
    return min(near, key=lambda c: (c.alpha, -c.l1))


def choose_by_judge(candidates: Sequence[Candidate], judged: Callable[[Candidate | None, int], float],
                    progress: bool = True) -> Candidate:
    """`judged(candidate or None for unsteered, label)`: share of that label's validation continuations flagged."""
    unsteered_0 = judged(None, 0)
    for c in tqdm(candidates, desc="judge alphas", unit="candidate", disable=not progress):
        c.judge_rate, c.judge_rate_0 = judged(c, 1), judged(c, 0)
    return min(candidates, key=lambda c: (c.judge_cost(unsteered_0), c.alpha, -c.l1))
