"""vLLM's own MoE families that can be steered: the one place that knows their layouts.

One `Family` per vLLM model class (keyed by `architectures[0]`): where each decoder layer's
router ("gate") and FusedMoE layer live in vLLM's module tree, which config fields give the
expert count, top-k and the layers without experts, which router kind it is, and whether it
has shared experts. Everything else (hooks, profiles, metrics) reads this table.

Router kinds of the families (how vLLM 0.32 scores and selects; docs/steering-vllm-models.md):

  softmax               softmax over the experts, top-k (renormalised where the config says)
  topk-softmax          top-k of the logits, softmax over the chosen (gpt-oss)
  sparsemixer           Phi-MoE's top-2 sparsemixer
  grouped-softmax       DeepSeek V1/V2: vLLM routes them through grouped top-k (V1 has one group)
  grouped-sigmoid-bias  DeepSeek V3 (`noaux_tc`): sigmoid scores, selection by score plus the
                        learned correction bias, groups ranked by their top-2 sum

The first three select by logit order, so steering is a transform of the router's logits
(kernels/routing_reference.steer_router_logits). The grouped kinds select on a score that a
logit cannot veto, so include/exclude act on the selection score
(kernels/routing_reference.grouped_select).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .shape import SteerableModel, fingerprint_of

LOGIT_ORDER_KINDS = ("softmax", "topk-softmax", "sparsemixer")


def _every_layer(config, layer: int) -> bool:
    return True


def _qwen_moe_layer(config, layer: int) -> bool:
    """vLLM's qwen2_moe.py / qwen3_moe.py rule for a layer with experts."""
    return (layer not in (getattr(config, "mlp_only_layers", None) or [])
            and config.num_experts > 0 and (layer + 1) % getattr(config, "decoder_sparse_step", 1) == 0)


def _deepseek_moe_layer(config, layer: int) -> bool:
    """vLLM's deepseek_v2.py rule: experts from first_k_dense_replace on, every moe_layer_freq."""
    return (config.n_routed_experts is not None and layer >= (config.first_k_dense_replace or 0)
            and layer % getattr(config, "moe_layer_freq", 1) == 0)


def _deepseek_kind(config) -> str:
    scoring = getattr(config, "scoring_func", "softmax")  # vLLM's default when the config has none
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"{config.architectures[0]}: scoring_func={scoring!r} cannot be steered (softmax or sigmoid)")
    return f"grouped-{scoring}" + ("-bias" if getattr(config, "topk_method", None) == "noaux_tc" else "")


@dataclass(frozen=True)
class Family:
    """How one vLLM model class lays out its MoE layers."""

    block: str  # attribute of a decoder layer holding the MoE block
    gate: str  # attribute of the block: the module that returns the router logits
    experts_field: str  # config field: routed experts per layer
    kind: Callable[[object], str]
    is_moe_layer: Callable[[object, int], bool] = _every_layer
    has_shared: Callable[[object], bool] = lambda config: False
    groups: Callable[[object], tuple[int, int]] = lambda config: (1, 1)  # (groups, groups chosen)

    def describe(self, config) -> SteerableModel:
        L = config.num_hidden_layers
        dense = tuple(l for l in range(L) if not self.is_moe_layer(config, l))
        kind = self.kind(config)
        values = dict(architecture=config.architectures[0], layers=L, experts=getattr(config, self.experts_field),
                      top_k=config.num_experts_per_tok, kind=kind, dense=dense, hidden=config.hidden_size,
                      vocab=config.vocab_size, groups=self.groups(config), shared=self.has_shared(config))
        return SteerableModel(
            architecture=values["architecture"], num_layers=L, num_experts=values["experts"],
            top_k=values["top_k"], router_kind=kind, dense_layers=dense, shared_experts=values["shared"],
            fingerprint=fingerprint_of(values),
            layer_to_pool=tuple(None if l in dense else l for l in range(L)),  # each MoE layer: its own experts
        )


_MIXTRAL = Family("block_sparse_moe", "gate", "num_local_experts", lambda c: "softmax")
_QWEN_MOE = Family("mlp", "gate", "num_experts", lambda c: "softmax", _qwen_moe_layer,
                   has_shared=lambda c: (getattr(c, "shared_expert_intermediate_size", 0) or 0) > 0)
_DEEPSEEK = Family("mlp", "gate", "n_routed_experts", _deepseek_kind, _deepseek_moe_layer,
                   has_shared=lambda c: (getattr(c, "n_shared_experts", 0) or 0) > 0,
                   groups=lambda c: (getattr(c, "n_group", None) or 1, getattr(c, "topk_group", None) or 1))

FAMILIES: dict[str, Family] = {
    "MixtralForCausalLM": _MIXTRAL,
    "Qwen2MoeForCausalLM": _QWEN_MOE,
    "Qwen3MoeForCausalLM": _QWEN_MOE,
    "OlmoeForCausalLM": Family("mlp", "gate", "num_experts", lambda c: "softmax"),
    "DeepseekForCausalLM": _DEEPSEEK,
    "DeepseekV2ForCausalLM": _DEEPSEEK,
    "DeepseekV3ForCausalLM": _DEEPSEEK,
    "PhiMoEForCausalLM": Family("block_sparse_moe", "gate", "num_local_experts", lambda c: "sparsemixer"),
    "GptOssForCausalLM": Family("mlp", "router", "num_local_experts", lambda c: "topk-softmax"),
}


def family_of(config) -> Family:
    """The Family of a config's `architectures[0]`; ValueError naming the supported ones otherwise."""
    architectures = getattr(config, "architectures", None) or []
    name = architectures[0] if architectures else None
    if name not in FAMILIES:
        hint = " (transformers saves Phi-MoE as PhimoeForCausalLM: vLLM's class is PhiMoEForCausalLM)" \
            if name == "PhimoeForCausalLM" else ""
        raise ValueError(f"architecture {name!r} cannot be steered{hint}; supported: UniPoolForCausalLM, "
                         f"{', '.join(FAMILIES)}")
    return FAMILIES[name]
