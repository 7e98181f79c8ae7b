"""`unipool-steering fit`, end to end: capture, surrogate, S, alpha, profile, evaluation.

    examples -> split (train / validation / test, stratified, by --seed; with --judge-data
                the judge's own examples are the validation part, the data train / test)
             -> capture router logits of every example once (sources.py, server.py)
             -> train the surrogate on the training split; accuracy on validation and test
             -> per lambda: optimise S on the training label-1 traces, sparsify
             -> per --exclude-cap: the experts to exclude, by the training split's risk
                difference (SteerMoE; expert_selection.py), and the bias that difference gives
             -> pick among bias only, exclusions only and both on the validation split
                (surrogate, or judge)
             -> the profile, with its provenance; the evaluation table on the test split

Deterministic for a seed: every random draw (split, surrogate init, batch order, random
controls) comes from a generator seeded by it; only the provenance's `created` differs
between two runs.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from unipool_serve.model_executor.config import UniPoolConfig
from unipool_serve.model_executor.steering.profile import SteeringProfile
from unipool_serve.model_executor.steering.shape import SteerableModel
from . import expert_selection, optimise, report, surrogate as surrogate_mod
from .data import Example, Splits, split
from .judge import Judge

DEFAULT_ALPHAS = (0.5, 1.0, 2.0, 4.0, 8.0)
DEFAULT_LAMBDAS = (1e-3, 1e-2)
DEFAULT_EXCLUDE_CAPS = (2, 4)
DEFAULT_MIN_RISK_DIFFERENCE = 0.05
METHOD = ("unipool-steering fit: MASCing surrogate (LayerNorm, shared Linear E->16, LSTM 64, Linear 1; BCE, Adam) "
          "on router logits; S by Adam against the frozen surrogate (target label 0, L1), sparsified; "
          "SteerMoE exclusions (per-layer top-k selection risk difference label 1 - label 0, capped per layer) and "
          "the risk-difference bias (-rd scaled to [-1, 1] per layer, sparsified); "
          "bias only, exclusions only or both, chosen on the validation split (or the judge's own examples)")


class FitError(ValueError):
    """The fit cannot go on; the message says why and what to change."""


@dataclass
class FitOptions:
    name: str
    seed: int = 0
    lambdas: Sequence[float] = DEFAULT_LAMBDAS
    alphas: Sequence[float] = DEFAULT_ALPHAS
    threshold: float = 0.1
    exclude_caps: Sequence[int] = DEFAULT_EXCLUDE_CAPS  # () or (0,): bias only, as before selection existed
    include_cap: int = 0
    risk_difference_bias: bool = False  # the risk difference's own bias among the candidates (--risk-difference-bias)
    min_risk_difference: float = DEFAULT_MIN_RISK_DIFFERENCE
    surrogate_epochs: int = 30
    bias_epochs: int = 100
    judge: Judge | None = None
    judge_tokens: int = 32
    # --judge-data: examples of their own for the choice (e.g. prompts that lead to the behaviour,
    # while --data holds text that shows it); then --data is split into training and test only
    judge_examples: Sequence[Example] = ()
    judge_data_hash: str | None = None
    description: str = ""
    compare: Sequence[SteeringProfile] = ()
    progress: bool = True


@dataclass
class FitResult:
    profile: SteeringProfile
    rows: list[report.Row]
    accuracy: dict[str, float]
    candidates: list[optimise.Candidate]
    chosen: optimise.Candidate
    counts: dict[int, int] = field(default_factory=dict)  # test examples per label

    def table(self) -> str:
        return report.format_table(self.rows, self.counts)

    def candidates_table(self) -> str:
        return report.format_candidates(self.candidates, self.chosen)


def check_logits_shape(traces: Sequence[torch.Tensor], config: UniPoolConfig | SteerableModel, source: str) -> None:
    model = SteerableModel.of(config)  # a UniPool config, or a family's shape
    want = (model.num_layers, model.num_experts)
    for trace in traces:
        if tuple(trace.shape[1:]) != want:
            raise FitError(f"{source} gives router logits for {list(trace.shape[1:])} (layers, experts) but the model "
                           f"folder is for {list(want)}: point --model at the folder of the model being captured")


@dataclass
class Captured:
    """Router-logit traces of every example, by split, and the examples' labels."""

    splits: Splits
    traces: dict[str, list[torch.Tensor]]  # split -> [T, L, E] per example, in the split's order
    labels: dict[str, list[int]]

    def of_label(self, name: str, label: int) -> list[torch.Tensor]:
        return [t for t, y in zip(self.traces[name], self.labels[name]) if y == label]

    def examples(self, name: str, label: int) -> list[Example]:
        return [e for e in getattr(self.splits, name) if e.label == label]


def capture_splits(source, config: UniPoolConfig, examples: list[Example], opts: FitOptions) -> Captured:
    """Split the examples and capture each one's router logits once (the judge's own examples, if
    any, as the validation part)."""
    splits = split(examples, opts.seed, validation=not opts.judge_examples)
    if opts.judge_examples:
        splits = Splits(splits.train, list(opts.judge_examples), splits.test)
    parts = {"train": splits.train, "val": splits.val, "test": splits.test}
    captured = source.capture([e for part in parts.values() for e in part], progress=opts.progress)
    check_logits_shape(captured, config, source.description)
    traces, start = {}, 0
    for name, part in parts.items():
        traces[name], start = captured[start:start + len(part)], start + len(part)
    return Captured(splits, traces, {name: [e.label for e in part] for name, part in parts.items()})


def fit_biases(model, data: Captured, opts: FitOptions, have_others: bool) -> dict[float, torch.Tensor]:
    """lambda -> the sparsified S it gives (the all-zero ones left out). None left is an error only
    when there is nothing else to try either (no exclusion set, no risk-difference bias)."""
    biases = {}
    for l1 in opts.lambdas:
        fitted = optimise.fit_bias(model, data.of_label("train", 1), l1=l1, seed=opts.seed, epochs=opts.bias_epochs,
                                   progress=opts.progress)
        sparse = optimise.sparsify(fitted, opts.threshold)
        if sparse.any():
            biases[l1] = sparse
    if not biases and not have_others:
        raise FitError(f"every fitted S is zero once entries with |S| <= {opts.threshold} are dropped, and no expert "
                       f"passes --min-risk-difference {opts.min_risk_difference}: lower --lambda or --threshold (or "
                       "check the surrogate's accuracy: it may have found no signal)")
    return biases


def select_experts(config, data: Captured, opts: FitOptions) -> tuple[torch.Tensor, dict]:
    """(the training split's risk difference [L, E], cap -> mask); caps whose mask is empty or the
    same as a smaller cap's are left out (they would be judged twice)."""
    top_k = SteerableModel.of(config).top_k
    rd = expert_selection.risk_difference(data.of_label("train", 1), data.of_label("train", 0), top_k)
    masks: dict[int, torch.Tensor] = {}
    for cap in sorted(set(opts.exclude_caps)):
        mask = expert_selection.expert_mask(rd, exclude_cap=cap, top_k=top_k, min_rd=opts.min_risk_difference,
                                            include_cap=opts.include_cap)
        if mask.any() and not any(torch.equal(mask, m) for m in masks.values()):
            masks[cap] = mask
    return rd, masks


def judge_on(split: str, source, data: Captured, opts: FitOptions):
    """(profile or None, label) -> the judge's rate of the split's continuations under that profile."""
    def judged(profile, label):
        return opts.judge.rate(source.generate(data.examples(split, label), profile, opts.judge_tokens,
                                               progress=False))

    return judged


def choose(candidates: list[optimise.Candidate], source, data: Captured, opts: FitOptions,
           as_profile) -> optimise.Candidate:
    """The candidate the judge (on the validation split's continuations) or else the surrogate prefers."""
    if opts.judge is None:
        return optimise.choose_by_surrogate(candidates)
    judged = judge_on("val", source, data, opts)
    return optimise.choose_by_judge(
        candidates, lambda candidate, label: judged(None if candidate is None else as_profile(candidate), label),
        opts.progress)


def evaluate(model, fitted: SteeringProfile, chosen: optimise.Candidate, source, data: Captured,
             opts: FitOptions) -> list[report.Row]:
    """The test split's table: unsteered, the fitted profile, its random controls, the compared profiles."""
    steerings = [("unsteered", None), (f"fitted ({chosen.describe()})", fitted),
                 *report.random_controls(fitted), *((f"compare: {p.name}", p) for p in opts.compare)]
    return report.evaluate(model, steerings, data.of_label("test", 1), data.of_label("test", 0),
                           judge_on("test", source, data, opts) if opts.judge is not None else None)


def fit_provenance(source, examples: list[Example], data_hash: str, data: Captured, acc: dict[str, float],
               chosen: optimise.Candidate, candidates: list[optimise.Candidate], rows: list[report.Row],
               rd: torch.Tensor, opts: FitOptions) -> dict:
    """How the profile was made: written into its file (never part of its routing or its hash)."""
    return {
        "method": METHOD, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source.description, "data_sha256": data_hash, "judge_data_sha256": opts.judge_data_hash,
        "split_seed": opts.seed,
        "splits": data.splits.sizes(),
        "examples": {"label_1": sum(e.label for e in examples), "label_0": sum(1 - e.label for e in examples)},
        "tokens": "chat: the final user message; plain prompt: every prompt token",
        "surrogate": {"epochs": opts.surrogate_epochs, "accuracy": {k: round(v, 4) for k, v in acc.items()}},
        "kind": chosen.kind, "bias": chosen.bias_source, "lambda": chosen.l1,
        "alpha": chosen.alpha if chosen.has_bias else None,
        "threshold": opts.threshold, "bias_epochs": opts.bias_epochs, "nonzero": int((chosen.bias != 0).sum()),
        "exclude_cap": chosen.exclude_cap, "excluded": chosen.excluded, "included": chosen.included,
        "selection": {"exclude_caps": list(opts.exclude_caps), "include_cap": opts.include_cap,
                      "min_risk_difference": opts.min_risk_difference,
                      "risk_difference": [[round(float(v), 4) for v in row] for row in rd]},
        "alpha_chosen_by": opts.judge.spec if opts.judge is not None else "surrogate",
        "candidates": [c.as_dict() for c in candidates],
        "evaluation": [r.as_dict() for r in rows],
    }


def run_fit(source, config: UniPoolConfig, examples: list[Example], data_hash: str, opts: FitOptions) -> FitResult:
    """The whole run (see the module doc), one step per function."""
    data = capture_splits(source, config, examples, opts)
    model = surrogate_mod.train_surrogate(data.traces["train"], data.labels["train"], seed=opts.seed,
                                          epochs=opts.surrogate_epochs, progress=opts.progress)
    acc = {name: surrogate_mod.accuracy(model, data.traces[name], data.labels[name]) for name in ("train", "val", "test")}
    rd, masks = select_experts(config, data, opts)
    rd_bias = expert_selection.risk_difference_bias(rd, opts.threshold) if opts.risk_difference_bias else None
    biases = fit_biases(model, data, opts, have_others=bool(masks) or rd_bias is not None)
    candidates = optimise.score_candidates(model, optimise.make_candidates(biases, opts.alphas, masks, rd_bias),
                                           data.of_label("val", 1))

    def as_profile(candidate: optimise.Candidate, provenance=None):
        include, exclude = ({}, {}) if candidate.mask is None else expert_selection.mask_sets(candidate.mask)
        return SteeringProfile.for_config(config, name=opts.name, bias=candidate.bias, alpha=candidate.alpha or 1.0,
                                          include=include, exclude=exclude, description=opts.description,
                                          provenance=provenance)

    chosen = choose(candidates, source, data, opts, as_profile)
    rows = evaluate(model, as_profile(chosen), chosen, source, data, opts)
    made = fit_provenance(source, examples, data_hash, data, acc, chosen, candidates, rows, rd, opts)
    profile = as_profile(chosen, provenance=made)
    counts = {y: len(data.examples("test", y)) for y in (0, 1)}
    return FitResult(profile, rows, acc, candidates, chosen, counts)
