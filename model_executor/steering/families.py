"""vLLM's own MoE families that can be steered: the one place that knows their layouts.

One `Family` per vLLM model class (keyed by `architectures[0]`): where each decoder layer's
router ("gate") and FusedMoE layer live in vLLM's module tree, which config fields give the
expert count, top-k and the layers without experts, which router kind it is, and whether it
has shared experts. Everything else (hooks, profiles, metrics) reads this table.

Their router kinds are kernels/routing_spec.FAMILY_ROUTER_KINDS: the same kind of table as
our own models' ROUTER_KINDS, saying where steering reaches each kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from unipool_serve.kernels.routing_spec import FAMILY_ROUTER_KINDS, FamilyRouterKind


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


def _always(kind: str) -> Callable[[object], str]:
    return lambda config: kind


@dataclass(frozen=True)
class Family:
    """How one vLLM model class lays out its MoE layers."""

    block: str  # attribute of a decoder layer holding the MoE block
    gate: str  # attribute of the block: the module that returns the router logits
    experts_field: str  # config field: routed experts per layer
    kind: Callable[[object], str]  # config -> a name of FAMILY_ROUTER_KINDS
    is_moe_layer: Callable[[object, int], bool] = _every_layer
    has_shared: Callable[[object], bool] = lambda config: False
    groups: Callable[[object], tuple[int, int]] = lambda config: (1, 1)  # (groups, groups chosen)

    def router_kind(self, config) -> FamilyRouterKind:
        return FAMILY_ROUTER_KINDS[self.kind(config)]

    def dense_layers(self, config) -> tuple[int, ...]:
        """The layers without routed experts."""
        return tuple(l for l in range(config.num_hidden_layers) if not self.is_moe_layer(config, l))


_MIXTRAL = Family("block_sparse_moe", "gate", "num_local_experts", _always("softmax"))
_QWEN_MOE = Family("mlp", "gate", "num_experts", _always("softmax"), _qwen_moe_layer,
                   has_shared=lambda c: (getattr(c, "shared_expert_intermediate_size", 0) or 0) > 0)
_DEEPSEEK = Family("mlp", "gate", "n_routed_experts", _deepseek_kind, _deepseek_moe_layer,
                   has_shared=lambda c: (getattr(c, "n_shared_experts", 0) or 0) > 0,
                   groups=lambda c: (getattr(c, "n_group", None) or 1, getattr(c, "topk_group", None) or 1))

FAMILIES: dict[str, Family] = {
    "MixtralForCausalLM": _MIXTRAL,
    "Qwen2MoeForCausalLM": _QWEN_MOE,
    "Qwen3MoeForCausalLM": _QWEN_MOE,
    "OlmoeForCausalLM": Family("mlp", "gate", "num_experts", _always("softmax")),
    "DeepseekForCausalLM": _DEEPSEEK,
    "DeepseekV2ForCausalLM": _DEEPSEEK,
    "DeepseekV3ForCausalLM": _DEEPSEEK,
    "PhiMoEForCausalLM": Family("block_sparse_moe", "gate", "num_local_experts", _always("sparsemixer")),
    "GptOssForCausalLM": Family("mlp", "router", "num_local_experts", _always("topk-softmax")),
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
