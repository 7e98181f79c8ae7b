"""`unipool-steering probe`: a routing probe fitted from labelled examples (model_executor/steering/probe.py).

    examples -> split (train / validation / test, stratified, by --seed; data.py)
             -> capture the raw router logits of each example once (the sources `fit` uses)
             -> features: each example's routing distribution, the mean softmax per MoE layer [R, E]
             -> logistic regression on the training split (features standardised, L2, L-BFGS)
             -> threshold on the validation split: the lowest score at which at most --fpr of the
                label-0 examples fire
             -> the probe, with AUROC and the rates at the threshold on validation and test

Deterministic for a seed: the split is the only random draw (the regression is convex).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from unipool_serve.model_executor.steering.probe import RoutingProbe, moe_layers
from unipool_serve.model_executor.steering.shape import SteerableModel

from .data import Example, split

METHOD = ("unipool-steering probe: logistic regression (L2, L-BFGS) on each example's routing distribution "
          "(mean softmax of the raw router logits per MoE layer over the scored tokens)")
DEFAULT_FPR = 0.05


@dataclass
class ProbeFit:
    probe: RoutingProbe
    metrics: dict[str, dict[str, float]]  # split -> auroc, tpr, fpr at the threshold, counts

    def table(self) -> str:
        lines = [f"{'split':<6}{'examples':>10}{'AUROC':>8}{'TPR':>8}{'FPR':>8}"]
        for name, m in self.metrics.items():
            lines.append(f"{name:<6}{m['label_1'] + m['label_0']:>10}{m['auroc']:>8.3f}{m['tpr']:>8.1%}{m['fpr']:>8.1%}")
        return "\n".join(lines)


def distributions(traces: Sequence[torch.Tensor], model: SteerableModel) -> np.ndarray:
    """[N, R, E]: each trace's mean routing distribution over its tokens, on the MoE layers. A trace has
    a row per decoder layer (a reference model) or per MoE layer (a server's capture)."""
    rows = list(moe_layers(model))
    out = []
    for trace in traces:
        t = trace.float()
        if t.shape[1] == model.num_layers and len(rows) != model.num_layers:
            t = t[:, rows]
        out.append(torch.softmax(t.double(), dim=-1).mean(dim=0).numpy())
    return np.stack(out)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a label-1 example scores above a label-0 one (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def threshold_for(scores_label_0: np.ndarray, fpr: float) -> float:
    """The lowest threshold at which at most `fpr` of these label-0 scores reach it."""
    ranked = np.sort(scores_label_0)[::-1]
    allowed = int(math.floor(fpr * len(ranked) + 1e-9))
    if allowed >= len(ranked):
        return 0.0
    return float(np.nextafter(ranked[allowed], np.inf))


def logistic_regression(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """(w, b) minimising the mean BCE + l2 * |w|^2 / 2 on standardised x [N, D]."""
    xt, yt = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def loss():
        optimiser.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt) + 0.5 * l2 * (w * w).sum()
        value.backward()
        return value

    optimiser.step(loss)
    return w.detach().numpy(), float(b.detach())


def fit_probe(source, model, examples: list[Example], data_hash: str, *, name: str, seed: int = 0,
              fpr: float = DEFAULT_FPR, l2: float = 1e-2, labels: dict[str, str] | None = None,
              description: str = "", progress: bool = True) -> ProbeFit:
    model = SteerableModel.of(model)
    splits = split(examples, seed)
    parts = {"train": splits.train, "val": splits.val, "test": splits.test}
    # every prompt token: what a served probe scores
    traces = source.capture([e for part in parts.values() for e in part], progress=progress, whole_prompt=True)
    features, start = {}, 0
    for part_name, part in parts.items():
        features[part_name] = distributions(traces[start:start + len(part)], model)
        start += len(part)
    ys = {part_name: np.array([e.label for e in part]) for part_name, part in parts.items()}

    flat = features["train"].reshape(len(parts["train"]), -1)
    mean, std = flat.mean(axis=0), flat.std(axis=0) + 1e-6
    w, b = logistic_regression((flat - mean) / std, ys["train"], l2)
    weight = (w / std).reshape(features["train"].shape[1:])  # standardisation folded in
    bias = b - float((w * mean / std).sum())

    def scores(part_name: str) -> np.ndarray:
        z = (features[part_name] * weight).sum(axis=(1, 2)) + bias
        return 1.0 / (1.0 + np.exp(-z))

    threshold = threshold_for(scores("val")[ys["val"] == 0], fpr)
    metrics = {}
    for part_name in parts:
        s, y = scores(part_name), ys[part_name]
        fired = s >= threshold
        metrics[part_name] = {"auroc": round(auroc(s, y), 4), "tpr": round(float(fired[y == 1].mean()), 4),
                              "fpr": round(float(fired[y == 0].mean()), 4), "label_1": int((y == 1).sum()),
                              "label_0": int((y == 0).sum())}
    provenance = {
        "method": METHOD, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source.description, "data_sha256": data_hash, "split_seed": seed, "splits": splits.sizes(),
        "l2": l2, "target_fpr": fpr, "metrics": metrics,
        "tokens": "every prompt token (a chat: its whole rendered prompt)",
    }
    probe = RoutingProbe.for_model(model, name=name, weight=weight, bias=bias, threshold=threshold,
                                   labels=labels or {"1": "behaviour", "0": "other"}, target_fpr=fpr,
                                   description=description, provenance=provenance)
    return ProbeFit(probe, metrics)
