"""Steering profiles: a named, validated router bias and expert include/exclude sets.

File format (docs/steering.md): one safetensors file holding tensor `bias`
[L, E] fp32 (the unscaled MASCing matrix S) and string metadata:
  format="unipool-steering/1", name, description, alpha, include, exclude (JSON
  {layer: [expert ids]}), num_layers, num_experts, top_k, config_fingerprint, and, where
  known, architecture, router_kind, dense_layers (JSON list) and expert_budget (JSON
  {"top_k": k'}: each token of a request under the profile runs at most k' routed experts, 0 on
  the shared experts alone; contract.effective_budget), and optionally provenance
  (a JSON object: how the profile was made, e.g. by `unipool-steering fit`; informational,
  never part of the routing or the content hash).
The engine applies `alpha * bias` and the masks exactly as
kernels/routing_reference.py documents. A profile is made for one SteerableModel
(steering/shape.py): a UniPool model or one of vLLM's own MoE families.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from . import contract
from .profile_checks import SteeringProfileError, check_budget, check_dense_layers, check_model, check_provenance
from .shape import SteerableModel

FORMAT = "unipool-steering/1"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NAME_RULE = "1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise SteeringProfileError(f"invalid profile name {name!r}: use {NAME_RULE}")
    return name


@dataclass
class SteeringProfile:
    """A router steering profile for one model (layer count, experts, router kind, config fingerprint)."""

    name: str
    bias: torch.Tensor  # [L, E] fp32, unscaled
    num_layers: int
    num_experts: int
    top_k: int
    config_fingerprint: str
    alpha: float = 1.0
    include: dict[int, list[int]] = field(default_factory=dict)
    exclude: dict[int, list[int]] = field(default_factory=dict)
    description: str = ""
    architecture: str = ""  # "" in files written before families were supported: UniPool models
    router_kind: str = ""
    dense_layers: tuple[int, ...] = ()
    # {"top_k": k'}: each token runs on its first k' routed experts (contract.parse_budget's rule);
    # k' = 0 leaves the shared experts alone, for models that have them.
    expert_budget: dict | None = None
    provenance: dict | None = None  # how it was made (JSON-serialisable); not part of the content hash

    def __post_init__(self) -> None:
        self.include = _expert_sets(self.include, "include")
        self.exclude = _expert_sets(self.exclude, "exclude")
        self.validate()

    # ---- construction ------------------------------------------------------
    @classmethod
    def for_config(cls, config, *, name: str, bias=None, alpha: float = 1.0, include=None, exclude=None,
                   description: str = "", expert_budget: dict | None = None,
                   provenance: dict | None = None) -> SteeringProfile:
        """For a model given by its config (UniPoolConfig, a vLLM family's config) or SteerableModel."""
        model = SteerableModel.of(config)
        shape = (model.num_layers, model.num_experts)
        bias = torch.zeros(shape) if bias is None else torch.as_tensor(bias, dtype=torch.float32)
        return cls(
            name=name, bias=bias, alpha=alpha, include=include or {}, exclude=exclude or {},
            description=description, num_layers=shape[0], num_experts=shape[1], top_k=model.top_k,
            config_fingerprint=model.fingerprint, architecture=model.architecture, router_kind=model.router_kind,
            dense_layers=model.dense_layers, expert_budget=expert_budget, provenance=provenance,
        ).validate(model)

    @classmethod
    def from_description(cls, desc: dict, config) -> SteeringProfile:
        """Build from a JSON-style dict: name, description, alpha, include, exclude, expert_budget and
        a bias given either dense ([[...] * E] * L) or sparse ({"layer": {"expert": value}})."""
        config = SteerableModel.of(config)
        unknown = set(desc) - {"name", "description", "alpha", "bias", "include", "exclude", "expert_budget"}
        if unknown:
            raise SteeringProfileError(f"unknown keys in profile description: {sorted(unknown)}")
        bias = desc.get("bias")
        if isinstance(bias, dict):
            dense = torch.zeros(config.num_layers, config.num_experts)
            for layer, row in bias.items():
                for expert, value in row.items():
                    l, e = _index(layer, config.num_layers, "bias layer"), _index(expert, config.num_experts, "bias expert")
                    dense[l, e] = float(value)
            bias = dense
        return cls.for_config(
            config, name=desc.get("name", ""), bias=bias, alpha=desc.get("alpha", 1.0),
            include=desc.get("include"), exclude=desc.get("exclude"), description=desc.get("description", ""),
            expert_budget=desc.get("expert_budget"),
        )

    # ---- validation --------------------------------------------------------
    def validate(self, config=None) -> SteeringProfile:
        """Check the profile on its own, and against a model (config or SteerableModel) when given."""
        check_name(self.name)
        layers, experts = self.num_layers, self.num_experts
        if tuple(self.bias.shape) != (layers, experts):
            raise SteeringProfileError(
                f"profile {self.name!r}: bias has shape {list(self.bias.shape)}, expected [{layers}, {experts}] "
                "(layers, pool experts)"
            )
        self.bias = self.bias.detach().to(torch.float32).cpu().contiguous()
        if not torch.isfinite(self.bias).all():
            raise SteeringProfileError(f"profile {self.name!r}: bias contains non-finite values (NaN or inf)")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise SteeringProfileError(f"profile {self.name!r}: alpha must be a finite number, got {self.alpha!r}")
        for kind, sets in (("include", self.include), ("exclude", self.exclude)):
            for layer, ids in sets.items():
                if not 0 <= layer < layers:
                    raise SteeringProfileError(f"profile {self.name!r}: {kind} names layer {layer}, model has {layers}")
                bad = [e for e in ids if not 0 <= e < experts]
                if bad:
                    raise SteeringProfileError(
                        f"profile {self.name!r}: {kind} layer {layer} names unknown experts {bad} (pool has {experts})"
                    )
        for layer in set(self.include) & set(self.exclude):
            both = sorted(set(self.include[layer]) & set(self.exclude[layer]))
            if both:
                raise SteeringProfileError(f"profile {self.name!r}: layer {layer} both includes and excludes {both}")
        for layer, ids in self.include.items():
            if len(ids) > self.top_k:
                raise SteeringProfileError(
                    f"profile {self.name!r}: layer {layer} includes {len(ids)} experts, more than top_k={self.top_k}"
                )
        for layer, ids in self.exclude.items():
            if experts - len(ids) < self.top_k:
                raise SteeringProfileError(
                    f"profile {self.name!r}: layer {layer} excludes {len(ids)} of {experts} experts, "
                    f"leaving fewer than top_k={self.top_k} (to run on the shared experts alone, use "
                    '"expert_budget": {"top_k": 0} instead)'
                )
        check_dense_layers(self)
        check_budget(self)
        check_provenance(self)
        if config is not None:
            self.check_model(config)
        return self

    def check_model(self, config) -> None:
        check_model(self, config)

    # ---- what the engine uses ---------------------------------------------
    def bias_rows(self) -> torch.Tensor:
        return self.alpha * self.bias  # [L, E] fp32

    def mask_rows(self) -> torch.Tensor:
        mask = torch.zeros(self.num_layers, self.num_experts, dtype=torch.int8)
        for layer, ids in self.include.items():
            mask[layer, ids] = 1
        for layer, ids in self.exclude.items():
            mask[layer, ids] = -1
        return mask  # [L, E] int8

    def engine_rows(self) -> dict[str, torch.Tensor]:
        """What the engine's tables hold for this profile, one entry per contract.ROW_TABLES."""
        return {"bias": self.bias_rows(), "mask": self.mask_rows()}

    def content_hash(self) -> str:
        """Hash of everything that changes routing (not name or description)."""
        digest = hashlib.sha256(self.bias_rows().numpy().tobytes())
        digest.update(self.mask_rows().numpy().tobytes())
        digest.update(self.config_fingerprint.encode())
        if self.expert_budget is not None:  # absent from older hashes: their digests stay valid
            digest.update(json.dumps(self.expert_budget, sort_keys=True).encode())
        return digest.hexdigest()

    def summary(self) -> dict:
        """Metadata plus a per-layer summary (for listings and the HTTP API)."""
        rows = self.bias_rows()
        return {
            "name": self.name, "description": self.description, "alpha": self.alpha,
            "num_layers": self.num_layers, "num_experts": self.num_experts, "top_k": self.top_k,
            "config_fingerprint": self.config_fingerprint, "content_hash": contract.digest(self.content_hash()),
            "architecture": self.architecture, "router_kind": self.router_kind, "dense_layers": list(self.dense_layers),
            "expert_budget": self.expert_budget, "provenance": self.provenance,
            "layers": [
                {"layer": l, "nonzero_bias": int((rows[l] != 0).sum()), "max_abs_bias": float(rows[l].abs().max()),
                 "include": self.include.get(l, []), "exclude": self.exclude.get(l, [])}
                for l in range(self.num_layers)
            ],
        }

    # ---- files -------------------------------------------------------------
    def to_bytes(self) -> bytes:
        metadata = {
            "format": FORMAT, "name": self.name, "description": self.description, "alpha": repr(float(self.alpha)),
            "include": json.dumps({str(k): v for k, v in self.include.items()}),
            "exclude": json.dumps({str(k): v for k, v in self.exclude.items()}),
            "num_layers": str(self.num_layers), "num_experts": str(self.num_experts), "top_k": str(self.top_k),
            "config_fingerprint": self.config_fingerprint,
        }
        if self.router_kind:
            metadata.update(architecture=self.architecture, router_kind=self.router_kind,
                            dense_layers=json.dumps(list(self.dense_layers)))
        if self.expert_budget is not None:
            metadata["expert_budget"] = json.dumps(self.expert_budget)
        if self.provenance is not None:
            metadata["provenance"] = json.dumps(self.provenance, sort_keys=True)
        return save_tensors({"bias": self.bias}, metadata=metadata)

    def save(self, path: str | Path) -> Path:
        return write_atomically(path, self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, config=None, source: str = "profile") -> SteeringProfile:
        try:
            metadata = safetensors_metadata(data)
            tensors = load_tensors(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
            raise SteeringProfileError(f"{source}: not a valid safetensors file ({exc})") from None
        if metadata.get("format") != FORMAT:
            raise SteeringProfileError(f"{source}: metadata 'format' must be {FORMAT!r}, got {metadata.get('format')!r}")
        if set(tensors) != {"bias"}:
            raise SteeringProfileError(f"{source}: expected exactly one tensor 'bias', found {sorted(tensors)}")
        try:
            profile = cls(
                name=metadata["name"], description=metadata.get("description", ""), bias=tensors["bias"],
                alpha=float(metadata["alpha"]), include=json.loads(metadata.get("include", "{}")),
                exclude=json.loads(metadata.get("exclude", "{}")), num_layers=int(metadata["num_layers"]),
                num_experts=int(metadata["num_experts"]), top_k=int(metadata["top_k"]),
                config_fingerprint=metadata["config_fingerprint"], architecture=metadata.get("architecture", ""),
                router_kind=metadata.get("router_kind", ""),
                dense_layers=tuple(json.loads(metadata.get("dense_layers", "[]"))),
                expert_budget=json.loads(metadata["expert_budget"]) if "expert_budget" in metadata else None,
                provenance=json.loads(metadata["provenance"]) if "provenance" in metadata else None,
            )
        except SteeringProfileError:
            raise
        except (KeyError, ValueError, TypeError) as exc:
            raise SteeringProfileError(f"{source}: bad or missing metadata ({type(exc).__name__}: {exc})") from None
        return profile.validate(config)

    @classmethod
    def load(cls, path: str | Path, config=None) -> SteeringProfile:
        path = Path(path)
        return cls.from_bytes(path.read_bytes(), config, source=str(path))


def write_atomically(path: str | Path, data: bytes) -> Path:
    """Write a profile or probe file so that a reader never sees half of it."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def safetensors_metadata(data: bytes) -> dict[str, str]:
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise ValueError("header length exceeds file size")
    return json.loads(data[8:8 + header_len]).get("__metadata__") or {}


def _index(value, size: int, what: str) -> int:
    try:
        index = int(value)
    except (TypeError, ValueError):
        raise SteeringProfileError(f"{what} {value!r} is not an integer") from None
    if not 0 <= index < size:
        raise SteeringProfileError(f"{what} {index} out of range [0, {size})")
    return index


def _expert_sets(sets, kind: str) -> dict[int, list[int]]:
    if not isinstance(sets, dict):
        raise SteeringProfileError(f"{kind} must map layer -> list of expert ids, got {type(sets).__name__}")
    out = {}
    for layer, ids in sets.items():
        if not isinstance(ids, (list, tuple)) or not all(isinstance(e, int) and not isinstance(e, bool) for e in ids):
            raise SteeringProfileError(f"{kind} layer {layer!r}: expert ids must be a list of integers, got {ids!r}")
        if len(set(ids)) != len(ids):
            raise SteeringProfileError(f"{kind} layer {layer!r}: repeated expert ids {ids}")
        try:
            out[int(layer)] = sorted(ids)
        except ValueError:
            raise SteeringProfileError(f"{kind}: layer {layer!r} is not an integer") from None
    return out
