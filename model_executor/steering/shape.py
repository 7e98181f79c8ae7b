"""`SteerableModel`: what a steerable MoE model looks like, whoever wrote its model code.

Profiles are made for, validated against and loaded into one of these; the server's
metrics and the worker's tables are sized from it. It is read from a model's config: a
UniPool config (ours), or the config of one of vLLM's own MoE families (steering/families.py).

  architecture   the `architectures[0]` it was read from
  num_layers     decoder layers (profiles have one row per layer, expert or not)
  num_experts    routed experts per MoE layer (per pool, for UniPool)
  top_k          experts each token is routed to
  router_kind    how the router scores and selects (a name: kernels/routing_spec.py's
                 ROUTER_KINDS for UniPool, FAMILY_ROUTER_KINDS for vLLM's families)
  dense_layers   layers WITHOUT routed experts (DeepSeek's first_k_dense_replace, Qwen's
                 mlp_only_layers): a profile may not steer them
  shared_experts whether the MoE layers also run always-on shared experts (a routed budget of
                 zero is defined only then)
  fingerprint    a short hash of what a profile depends on
  layer_to_pool  [L] the expert pool each layer routes over (None: a dense layer); metrics read it
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .families import family_of


@dataclass(frozen=True)
class SteerableModel:
    architecture: str
    num_layers: int
    num_experts: int
    top_k: int
    router_kind: str
    dense_layers: tuple[int, ...]
    shared_experts: bool
    fingerprint: str
    layer_to_pool: tuple[int | None, ...]

    @property
    def is_unipool(self) -> bool:
        return self.architecture == "UniPoolForCausalLM"

    @classmethod
    def of(cls, config) -> SteerableModel:
        """From a config object: a SteerableModel (returned as is), a UniPoolConfig, or the config
        of a supported vLLM family. Raises ValueError naming the architecture otherwise."""
        if isinstance(config, SteerableModel):
            return config
        from ..config import UniPoolConfig

        if isinstance(config, UniPoolConfig) or getattr(config, "model_type", None) == "unipool":
            return cls(
                architecture="UniPoolForCausalLM", num_layers=config.num_hidden_layers,
                num_experts=config.num_experts, top_k=config.num_experts_per_tok, router_kind=config.router_type,
                dense_layers=(), shared_experts=bool(config.shared_expert_intermediate_size),
                fingerprint=config.fingerprint(),
                layer_to_pool=tuple(config.layer_to_pool(l) for l in range(config.num_hidden_layers)),
            )
        return cls._of_family(config)

    @classmethod
    def _of_family(cls, config) -> SteerableModel:
        family = family_of(config)
        L, dense = config.num_hidden_layers, family.dense_layers(config)
        values = dict(architecture=config.architectures[0], layers=L, experts=getattr(config, family.experts_field),
                      top_k=config.num_experts_per_tok, kind=family.router_kind(config).name, dense=dense,
                      hidden=config.hidden_size, vocab=config.vocab_size, groups=family.groups(config),
                      shared=family.has_shared(config))
        return cls(
            architecture=values["architecture"], num_layers=L, num_experts=values["experts"],
            top_k=values["top_k"], router_kind=values["kind"], dense_layers=dense, shared_experts=values["shared"],
            fingerprint=fingerprint_of(values),
            layer_to_pool=tuple(None if l in dense else l for l in range(L)),  # each MoE layer: its own experts
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> SteerableModel:
        """From a model folder's config.json (any supported architecture)."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ValueError(f"{folder}: no config.json (expected a model folder)")
        if json.loads((folder / "config.json").read_text()).get("model_type") == "unipool":
            from ..config import UniPoolConfig

            return cls.of(UniPoolConfig.from_pretrained(str(folder)))
        from transformers import AutoConfig

        return cls.of(AutoConfig.from_pretrained(str(folder)))


def fingerprint_of(values: dict) -> str:
    """Short stable hash of a dict of plain values (a family's config fields)."""
    blob = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
