"""Strict loading of our checkpoint format into the vLLM model (docs/checkpoint-format.md).

Every tensor is checked by name and full (unsharded) shape against the config before
it is copied, every expected tensor must be present, and nothing unknown may appear;
the error names the tensor and says what the config expects.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vllm.model_executor.model_loader.weight_utils import default_weight_loader

from .config import UniPoolConfig

# checkpoint sub-name -> (parameter sub-name, shard id) for vLLM's fused linear layers
_STACKED = {
    ".self_attn.q_proj.weight": (".self_attn.qkv_proj.weight", "q"),
    ".self_attn.k_proj.weight": (".self_attn.qkv_proj.weight", "k"),
    ".self_attn.v_proj.weight": (".self_attn.qkv_proj.weight", "v"),
    ".shared_expert.gate_proj.weight": (".shared_expert.gate_up_proj.weight", 0),
    ".shared_expert.up_proj.weight": (".shared_expert.gate_up_proj.weight", 1),
}


def checkpoint_shapes(config: UniPoolConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint for `config` must hold, with its full shape."""
    V, H, hd = config.vocab_size, config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    E, F, S = config.num_experts, config.expert_intermediate_size, config.shared_expert_intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    for l in range(config.num_hidden_layers):
        p = f"model.layers.{l}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
            p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q),
        })
        if S:
            shapes.update({p + "shared_expert.gate_proj.weight": (S, H), p + "shared_expert.up_proj.weight": (S, H),
                           p + "shared_expert.down_proj.weight": (H, S)})
    for r in range(config.num_routers):
        shapes[f"model.routers.{r}.weight"] = (E, H)
        if config.routing_spec().kind.learned_scale:
            shapes[f"model.routers.{r}.norm_scale"] = (1,)
    for p in range(config.num_pools):
        shapes[f"model.pools.{p}.gate_up_proj"] = (E, 2 * F, H)
        shapes[f"model.pools.{p}.down_proj"] = (E, H, F)
    return shapes


def _layout(config: UniPoolConfig) -> str:
    return (f"num_hidden_layers={config.num_hidden_layers}, layers_per_pool={config.layers_per_pool} "
            f"({config.num_pools} pool(s)), layers_per_router={config.layers_per_router} "
            f"({config.num_routers} router(s)), num_experts={config.num_experts}, "
            f"expert_intermediate_size={config.expert_intermediate_size}, router_type={config.router_type!r}, "
            f"shared_expert_intermediate_size={config.shared_expert_intermediate_size}")


def load_checkpoint(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Copy checkpoint tensors into `model`'s parameters; returns the parameter names loaded."""
    config: UniPoolConfig = model.config
    expected = checkpoint_shapes(config)
    params = dict(model.named_parameters())
    seen: set[str] = set()
    loaded: set[str] = set()
    for name, tensor in weights:
        if name == "lm_head.weight" and config.tie_word_embeddings:
            seen.add(name)  # tied: the embedding is the head
            continue
        if name not in expected:
            raise ValueError(f"checkpoint tensor {name!r} is not part of this model's layout ({_layout(config)})")
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, but the config "
                             f"expects {expected[name]} ({_layout(config)})")
        if not torch.is_floating_point(tensor) or not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"checkpoint tensor {name!r} must hold finite floating-point values")
        seen.add(name)
        target, shard = name, None
        for suffix, (param_suffix, shard_id) in _STACKED.items():
            if name.endswith(suffix):
                target, shard = name[: -len(suffix)] + param_suffix, shard_id
                break
        param = params.get(target)
        if param is None:  # owned by another pipeline stage
            continue
        loader = getattr(param, "weight_loader", default_weight_loader)
        if shard is None:
            loader(param, tensor)
        else:
            loader(param, tensor, shard)
        loaded.add(target)
    missing = sorted(set(expected) - seen)
    if missing:
        shown = ", ".join(repr(n) for n in missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"checkpoint is missing tensor(s) {shown} required by its config ({_layout(config)})")
    if config.tie_word_embeddings and "lm_head.weight" in params:
        loaded.add("lm_head.weight")
    return loaded
