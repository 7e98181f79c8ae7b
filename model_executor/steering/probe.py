"""Routing probes: a logistic classifier of a request's own routing, and its file format.

A probe scores how much a request's prompt looks like a behaviour (label 1 of the data it was
fitted on) from the routing the model computes anyway. Its feature is the request's routing
distribution: for each MoE layer (the rows of a routing capture), the mean over the scored
tokens of the softmax of the raw router logits, [R, E]:

    score = sigmoid(sum(weight * features) + bias)        fired = score >= threshold

The raw logits are the router's own, before any steering (routing_capture.py records them), so
a probe sees the request as the model routes it by itself at every layer it scores. A score
is a probe's estimate, only as good as its labelled data (docs/probes.md).

File format (safetensors): tensor `weight` [R, E] fp32 (standardisation folded in) and string
metadata: format="unipool-probe/1", name, description, bias, threshold, target_fpr, labels
(JSON {"1": what label 1 is, "0": what label 0 is}), layers (JSON list: the decoder layer of
each row), num_layers, num_experts, top_k, config_fingerprint, architecture, router_kind and
provenance (JSON: how it was fitted, its validation and test numbers; informational, not part
of its content hash).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .profile import check_name, safetensors_metadata, write_atomically
from .profile_checks import SteeringProfileError
from .shape import SteerableModel

FORMAT = "unipool-probe/1"


class ProbeError(SteeringProfileError):
    """A probe that cannot be used; the message names the problem."""


def moe_layers(model: SteerableModel) -> tuple[int, ...]:
    """The decoder layers a probe scores: those with routed experts (the rows of a routing capture)."""
    return tuple(l for l in range(model.num_layers) if l not in model.dense_layers)


def routing_distribution(logits: np.ndarray | torch.Tensor) -> np.ndarray:
    """Sum over tokens of the softmax of raw router logits: [T, R, E] -> [R, E] float64 (divide by T
    for the mean). Sums, so that a request's tokens can be added step by step."""
    z = torch.as_tensor(logits).double()
    return torch.softmax(z, dim=-1).sum(dim=0).numpy()


@dataclass
class RoutingProbe:
    """A fitted probe for one model (see the module doc)."""

    name: str
    weight: torch.Tensor  # [R, E] fp32
    bias: float
    threshold: float
    layers: tuple[int, ...]
    num_layers: int
    num_experts: int
    top_k: int
    config_fingerprint: str
    architecture: str = ""
    router_kind: str = ""
    labels: dict[str, str] = field(default_factory=lambda: {"1": "behaviour", "0": "other"})
    target_fpr: float | None = None
    description: str = ""
    provenance: dict | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ---- construction -----------------------------------------------------------------
    @classmethod
    def for_model(cls, model, *, name: str, weight, bias: float, threshold: float, **kwargs) -> RoutingProbe:
        model = SteerableModel.of(model)
        return cls(name=name, weight=torch.as_tensor(weight, dtype=torch.float32), bias=float(bias),
                   threshold=float(threshold), layers=moe_layers(model), num_layers=model.num_layers,
                   num_experts=model.num_experts, top_k=model.top_k, config_fingerprint=model.fingerprint,
                   architecture=model.architecture, router_kind=model.router_kind, **kwargs).validate(model)

    # ---- validation -------------------------------------------------------------------
    def validate(self, config=None) -> RoutingProbe:
        check_name(self.name)
        rows, experts = len(self.layers), self.num_experts
        if tuple(self.weight.shape) != (rows, experts):
            raise ProbeError(f"probe {self.name!r}: weight has shape {list(self.weight.shape)}, expected "
                             f"[{rows}, {experts}] (MoE layers, experts)")
        self.weight = self.weight.detach().to(torch.float32).cpu().contiguous()
        if not torch.isfinite(self.weight).all():
            raise ProbeError(f"probe {self.name!r}: weight contains non-finite values")
        for what, value in (("bias", self.bias), ("threshold", self.threshold)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ProbeError(f"probe {self.name!r}: {what} must be a finite number, got {value!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ProbeError(f"probe {self.name!r}: threshold {self.threshold} is not a probability (0..1)")
        if any(not 0 <= l < self.num_layers for l in self.layers) or list(self.layers) != sorted(set(self.layers)):
            raise ProbeError(f"probe {self.name!r}: layers {list(self.layers)} are not distinct layers of 0.."
                             f"{self.num_layers - 1} in order")
        if set(self.labels) != {"0", "1"} or not all(isinstance(v, str) for v in self.labels.values()):
            raise ProbeError(f"probe {self.name!r}: labels must name label \"1\" and label \"0\", got {self.labels!r}")
        if config is not None:
            self.check_model(config)
        return self

    def check_model(self, config) -> None:
        model = SteerableModel.of(config)
        mine = (self.num_layers, self.num_experts, self.top_k, self.layers, self.config_fingerprint)
        theirs = (model.num_layers, model.num_experts, model.top_k, moe_layers(model), model.fingerprint)
        if mine != theirs:
            raise ProbeError(f"probe {self.name!r} was fitted on another model: {self.architecture or 'a model'} "
                             f"(layers, experts, top_k)={mine[:3]}, fingerprint {self.config_fingerprint}; this model "
                             f"is {model.architecture} {theirs[:3]}, fingerprint {model.fingerprint}: fit it again "
                             "with `unipool-steering probe` on this model")

    # ---- scoring ----------------------------------------------------------------------
    def score(self, distribution: np.ndarray) -> float:
        """P(label 1) for a routing distribution [R, E] (the mean over the scored tokens)."""
        z = float((self.weight.double().numpy() * distribution).sum()) + self.bias
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0

    def content_hash(self) -> str:
        """Hash of what changes a score or a decision (not name, description or provenance)."""
        digest = hashlib.sha256(self.weight.numpy().tobytes())
        digest.update(json.dumps([self.bias, self.threshold, list(self.layers), self.config_fingerprint]).encode())
        return digest.hexdigest()

    def summary(self) -> dict:
        return {"name": self.name, "description": self.description, "labels": self.labels,
                "threshold": self.threshold, "target_fpr": self.target_fpr, "layers": list(self.layers),
                "num_layers": self.num_layers, "num_experts": self.num_experts, "top_k": self.top_k,
                "architecture": self.architecture, "config_fingerprint": self.config_fingerprint,
                "content_hash": self.content_hash()[:16], "provenance": self.provenance}

    # ---- files ------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        metadata = {
            "format": FORMAT, "name": self.name, "description": self.description, "bias": repr(float(self.bias)),
            "threshold": repr(float(self.threshold)), "labels": json.dumps(self.labels, sort_keys=True),
            "layers": json.dumps(list(self.layers)), "num_layers": str(self.num_layers),
            "num_experts": str(self.num_experts), "top_k": str(self.top_k),
            "config_fingerprint": self.config_fingerprint, "architecture": self.architecture,
            "router_kind": self.router_kind,
        }
        if self.target_fpr is not None:
            metadata["target_fpr"] = repr(float(self.target_fpr))
        if self.provenance is not None:
            metadata["provenance"] = json.dumps(self.provenance, sort_keys=True)
        return save_tensors({"weight": self.weight}, metadata=metadata)

    def save(self, path: str | Path) -> Path:
        return write_atomically(path, self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, config=None, source: str = "probe") -> RoutingProbe:
        try:
            metadata = safetensors_metadata(data)
            tensors = load_tensors(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
            raise ProbeError(f"{source}: not a valid safetensors file ({exc})") from None
        if metadata.get("format") != FORMAT:
            raise ProbeError(f"{source}: metadata 'format' must be {FORMAT!r}, got {metadata.get('format')!r}")
        if set(tensors) != {"weight"}:
            raise ProbeError(f"{source}: expected exactly one tensor 'weight', found {sorted(tensors)}")
        try:
            probe = cls(
                name=metadata["name"], weight=tensors["weight"], bias=float(metadata["bias"]),
                threshold=float(metadata["threshold"]), layers=tuple(json.loads(metadata["layers"])),
                num_layers=int(metadata["num_layers"]), num_experts=int(metadata["num_experts"]),
                top_k=int(metadata["top_k"]), config_fingerprint=metadata["config_fingerprint"],
                architecture=metadata.get("architecture", ""), router_kind=metadata.get("router_kind", ""),
                labels=json.loads(metadata.get("labels", '{"1": "behaviour", "0": "other"}')),
                target_fpr=float(metadata["target_fpr"]) if "target_fpr" in metadata else None,
                description=metadata.get("description", ""),
                provenance=json.loads(metadata["provenance"]) if "provenance" in metadata else None,
            )
        except ProbeError:
            raise
        except (KeyError, ValueError, TypeError) as exc:
            raise ProbeError(f"{source}: bad or missing metadata ({type(exc).__name__}: {exc})") from None
        return probe.validate(config)

    @classmethod
    def load(cls, path: str | Path, config=None) -> RoutingProbe:
        path = Path(path)
        return cls.from_bytes(path.read_bytes(), config, source=str(path))
