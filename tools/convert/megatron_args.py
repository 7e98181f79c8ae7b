"""From a Megatron training run's `args` to this project's config, or a one-line refusal.

The names are the UniPool fork's (megatron/training/arguments.py). Pools:

  --moe-expert-pool-mode hyper                     one global pool (UniPool): layers_per_pool = L
  --moe-expert-pool-mode hyper --moe-expert-pool-size N   grouped pools of N layers
  --moe-expert-pool-mode shared --moe-expert-pool-size N  the same sharing, args.num_experts = N * E
  none / shared_no_tie / stock megatron-core (no pool flags)   per-layer experts: layers_per_pool = 1

`global`, `grouped` and `sliding` route every layer over a pooled expert table through
per-layer visibility masks, which this format does not express: refused. So is every
training feature that changes the inference computation and has no counterpart here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from unipool_serve.model_executor.config import norm_router_constant
from .errors import ConversionError

_MISSING = object()
NORM_EPS = 1e-8  # kernels/routing_reference.py hard-codes NormRouter's eps

# (arg, value Megatron assumes when absent, test the value must pass, what is supported)
_MUST = (
    ("position_embedding_type", "learned_absolute", lambda v: v == "rope", "'rope'"),
    ("rotary_percent", 1.0, lambda v: v == 1.0, "1.0 (RoPE on the whole head)"),
    ("rotary_interleaved", False, lambda v: not v, "false"),
    ("use_rope_scaling", False, lambda v: not v, "false (no Llama-3.1 RoPE scaling)"),
    ("normalization", "LayerNorm", lambda v: v == "RMSNorm", "'RMSNorm'"),
    ("apply_layernorm_1p", False, lambda v: not v, "false (no zero-centred RMSNorm gamma)"),
    ("swiglu", False, lambda v: bool(v), "true (SwiGLU experts)"),
    ("squared_relu", False, lambda v: not v, "false"),
    ("add_bias_linear", True, lambda v: not v, "false (--disable-bias-linear)"),
    ("add_qkv_bias", False, lambda v: not v, "false"),
    ("qk_layernorm", False, lambda v: not v, "false"),
    ("multi_latent_attention", False, lambda v: not v, "false"),
    ("softmax_type", "vanilla", lambda v: v == "vanilla", "'vanilla'"),
    ("window_size", None, lambda v: v is None, "unset (no sliding-window attention)"),
    ("mtp_num_layers", None, lambda v: not v, "unset (no multi-token prediction layers)"),
    ("heterogeneous_layers_config_path", None, lambda v: v is None, "unset"),
    ("moe_layer_freq", 1, lambda v: v == 1 or (isinstance(v, list) and all(x == 1 for x in v)),
     "1 (every layer an MoE layer)"),
    ("moe_router_enable_expert_bias", False, lambda v: not v,
     "false (a selection-only expert bias has no counterpart in this format)"),
    ("moe_router_topk_scaling_factor", None, lambda v: v in (None, 1, 1.0), "unset or 1"),
    ("moe_router_num_groups", None, lambda v: not v, "unset (no group-limited routing)"),
    ("moe_router_group_topk", None, lambda v: not v, "unset"),
    ("moe_relu_routing", False, lambda v: not v, "false"),
    ("moe_router_force_load_balancing", False, lambda v: not v, "false (a benchmarking mode: random routing)"),
    ("moe_hash_routing", False, lambda v: not v, "false"),
    ("moe_shared_expert_gate", False, lambda v: not v, "false (no gated shared expert)"),
    ("moe_apply_probs_on_input", False, lambda v: not v, "false"),
    ("moe_latent_size", None, lambda v: not v, "unset"),
    ("moe_router_load_balancing_type", "aux_loss",
     lambda v: "sinkhorn" not in (v if isinstance(v, list) else [v]), "anything but 'sinkhorn'"),
    ("virtual_pipeline_model_parallel_size", None, lambda v: v in (None, 1), "unset"),
)


@dataclass
class MegatronRun:
    """What the converter takes from `args`: the config, the parallel grid, notes for the user."""

    config: dict  # UniPoolConfig keyword arguments, dtype and tokenizer ids not included
    tp_size: int
    pp_size: int
    ep_size: int
    notes: list[str] = field(default_factory=list)
    tokenizer_type: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    tokenizer_model: str | None = None


def _get(args, name: str, default=_MISSING):
    """args.name; `default` when absent or None (Megatron's own default), an error when required."""
    value = getattr(args, name, None)
    if value is None:
        if default is _MISSING:
            raise ConversionError(f"the checkpoint's args have no {name}: is this a Megatron GPT checkpoint "
                                  "saved by megatron/training/checkpointing.py?")
        return default
    return value


def _positive(args, name: str) -> int:
    value = _get(args, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConversionError(f"args.{name}={value!r} must be a positive integer")
    return value


def _layers_per_pool(args, layers: int) -> int:
    mode = _get(args, "moe_expert_pool_mode", "shared")
    size = _get(args, "moe_expert_pool_size", 1) or 1
    if mode == "hyper":
        per_pool = layers if size <= 1 else size
    elif mode == "shared":
        per_pool = max(size, 1)
    elif mode in ("none", "shared_no_tie"):
        per_pool = 1
    elif mode in ("global", "grouped", "sliding"):
        raise ConversionError(
            f"args.moe_expert_pool_mode={mode!r} is not supported: its layers route over a pooled table through "
            "per-layer masks; supported: 'hyper' (UniPool), 'shared', 'shared_no_tie', 'none'")
    else:
        raise ConversionError(f"args.moe_expert_pool_mode={mode!r} is unknown; supported: 'hyper' (UniPool), "
                              "'shared', 'shared_no_tie', 'none'")
    if layers % per_pool:
        raise ConversionError(f"args.moe_expert_pool_size={size} does not divide num_layers={layers}")
    return per_pool


def _router(args, experts: int, top_k: int) -> dict:
    if _get(args, "moe_norm_routing", False):
        eps = _get(args, "moe_norm_routing_eps", NORM_EPS)
        if eps != NORM_EPS:
            raise ConversionError(f"args.moe_norm_routing_eps={eps!r}: only {NORM_EPS} (the default) is supported")
        method = _get(args, "moe_norm_routing_init_method", "monte_carlo")
        if method == "monte_carlo":
            c = norm_router_constant(experts, top_k)
        elif method == "one":
            c = 1.0
        else:
            raise ConversionError(f"args.moe_norm_routing_init_method={method!r} is unknown; "
                                  "supported: 'monte_carlo', 'one'")
        return dict(router_type="norm", norm_topk_prob=False, norm_router_c=c)
    score = _get(args, "moe_router_score_function", "softmax")
    if score == "softmax":  # pre-softmax: gates are the full softmax's; else softmax over the top-k only
        return dict(router_type="softmax", norm_topk_prob=not _get(args, "moe_router_pre_softmax", False))
    if score == "sigmoid":  # Megatron renormalises sigmoid gates only when k > 1
        return dict(router_type="sigmoid", norm_topk_prob=top_k > 1)
    raise ConversionError(f"args.moe_router_score_function={score!r}: supported: 'softmax', 'sigmoid' "
                          "(or --moe-norm-routing)")


def read_run(args) -> MegatronRun:
    """Check `args` and derive the config; raises ConversionError naming the argument."""
    for name, default, ok, supported in _MUST:
        value = _get(args, name, default)
        if not ok(value):
            raise ConversionError(f"args.{name}={value!r} is not supported; supported: {supported}")
    if _get(args, "num_experts", None) is None:
        raise ConversionError("args.num_experts is unset: a dense model, not an MoE (UniPool) checkpoint")
    layers, hidden = _positive(args, "num_layers"), _positive(args, "hidden_size")
    heads = _positive(args, "num_attention_heads")
    groups = _get(args, "num_query_groups", heads) if _get(args, "group_query_attention", False) else heads
    head_dim = _get(args, "kv_channels", None) or hidden // heads
    experts, top_k = _positive(args, "num_experts"), _positive(args, "moe_router_topk")
    width = _get(args, "moe_ffn_hidden_size", None) or _positive(args, "ffn_hidden_size")
    tp = _get(args, "tensor_model_parallel_size", 1)
    ep = _get(args, "expert_model_parallel_size", 1)
    etp = _get(args, "expert_tensor_parallel_size", None) or tp
    if etp != tp:
        raise ConversionError(f"args.expert_tensor_parallel_size={etp} differs from tensor_model_parallel_size={tp}: "
                              "not supported")
    for name, total, parts in (("num_attention_heads", heads, tp), ("padded_vocab_size", _get(args, "padded_vocab_size"), tp),
                               ("num_experts", experts, ep), ("moe_ffn_hidden_size", width, tp)):
        if total % parts:
            raise ConversionError(f"args.{name}={total} is not divisible by its parallel size {parts}")
    config = dict(
        vocab_size=_positive(args, "padded_vocab_size"), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=groups, head_dim=head_dim,
        max_position_embeddings=_get(args, "max_position_embeddings", None) or _positive(args, "seq_length"),
        rms_norm_eps=float(_get(args, "norm_epsilon", 1e-5)),
        rope_parameters={"rope_type": "default", "rope_theta": float(_get(args, "rotary_base", 10000))},
        tie_word_embeddings=not _get(args, "untie_embeddings_and_output_weights", False),
        num_experts=experts, num_experts_per_tok=top_k, expert_intermediate_size=width,
        layers_per_pool=_layers_per_pool(args, layers), layers_per_router=1,
        shared_expert_intermediate_size=_get(args, "moe_shared_expert_intermediate_size", None) or 0,
        **_router(args, experts, top_k),
    )
    run = MegatronRun(config, tp, _get(args, "pipeline_model_parallel_size", 1), ep,
                      tokenizer_type=_get(args, "tokenizer_type", None), vocab_file=_get(args, "vocab_file", None),
                      merge_file=_get(args, "merge_file", None), tokenizer_model=_get(args, "tokenizer_model", None))
    capacity = _get(args, "moe_expert_capacity_factor", None)
    if capacity is not None:
        run.notes.append(f"args.moe_expert_capacity_factor={capacity}: served without token dropping")
    return run
