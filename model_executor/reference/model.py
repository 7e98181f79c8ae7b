"""Pure-PyTorch UniPool model: the numerical ground truth for every other path.

Needs torch and transformers only (no vLLM), so it runs wherever kernels run.
Attention, RoPE and RMSNorm are transformers' LLaMA modules; what is ours is the
MoE block: per-layer routers (tied across PathMoE blocks) over expert pools owned
once by the model and merely referenced by the layers that use them.

Shape legend: B batch, S sequence, T = B*S tokens, H hidden, E experts per pool,
F expert width, k experts per token, L layers.
"""

from __future__ import annotations

from collections.abc import Callable
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm, LlamaRotaryEmbedding

from unipool_serve.kernels.moe_reference import pool_moe
from unipool_serve.kernels.routing_spec import SteeringView

from ..config import UniPoolConfig
from ..router import PoolRouter

# (hidden [T,H], w_gate_up [E,2F,H], w_down [E,H,F], ids [T,k], weights [T,k]) -> [T,H]
ExpertsFn = Callable[..., torch.Tensor]


class ExpertPool(nn.Module):
    """E SwiGLU experts stored as two stacked tensors, shared by every layer that uses them."""

    def __init__(self, num_experts: int, hidden_size: int, width: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * width, hidden_size))  # [E, 2F, H]
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, width))  # [E, H, F]


class SharedExpert(nn.Module):
    """The optional always-on dense SwiGLU MLP of a layer."""

    def __init__(self, hidden_size: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, width, bias=False)
        self.up_proj = nn.Linear(hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PoolMoE(nn.Module):
    """A layer's MoE: its router's decision over its pool. Pool and router are references."""

    def __init__(self, config: UniPoolConfig, layer_idx: int, pool: ExpertPool, router: PoolRouter):
        super().__init__()
        self.layer_idx = layer_idx
        # Plain attributes, not submodules: the model owns pools and routers once.
        self.__dict__["pool"] = pool
        self.__dict__["router"] = router
        self.experts_fn: ExpertsFn = pool_moe

    def forward(self, hidden: torch.Tensor, steering: SteeringView | None) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq, hidden_size = hidden.shape
        flat = hidden.reshape(-1, hidden_size)  # [T, H]
        logits = self.router.logits(flat)  # [T, E]
        ids, weights = self.router.route(logits, self.layer_idx, steering)  # [T, k] int32, [T, k] fp32
        out = self.experts_fn(flat, self.pool.gate_up_proj, self.pool.down_proj, ids, weights)
        return out.reshape(batch, seq, hidden_size), logits


class UniPoolDecoderLayer(nn.Module):
    def __init__(self, config: UniPoolConfig, layer_idx: int, pool: ExpertPool, router: PoolRouter):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.moe = PoolMoE(config, layer_idx, pool, router)
        width = config.shared_expert_intermediate_size
        self.shared_expert = SharedExpert(config.hidden_size, width) if width else None

    def forward(self, hidden, position_embeddings, attention_mask, past_key_values, steering, **kwargs):
        residual = hidden
        hidden, _ = self.self_attn(
            self.input_layernorm(hidden), position_embeddings=position_embeddings,
            attention_mask=attention_mask, past_key_values=past_key_values, **kwargs,
        )
        hidden = residual + hidden
        normed = self.post_attention_layernorm(hidden)
        moe_out, router_logits = self.moe(normed, steering)
        if self.shared_expert is not None:
            moe_out = moe_out + self.shared_expert(normed)
        return hidden + moe_out, router_logits


class UniPoolPreTrainedModel(PreTrainedModel):
    config_class = UniPoolConfig
    config: UniPoolConfig
    base_model_prefix = "model"
    _keep_in_fp32_modules = ["routers"]
    _no_split_modules = ["UniPoolDecoderLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, ExpertPool):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, PoolRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.norm_scale is not None:
                init.ones_(module.norm_scale)
        else:
            super()._init_weights(module)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' loader, made strict: a missing, unexpected or mis-shaped tensor is an error."""
        want_info = kwargs.pop("output_loading_info", False)
        # transformers only logs which tensor mismatched; let it finish and report them ourselves.
        kwargs.setdefault("ignore_mismatched_sizes", True)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        mismatched = [f"{name} (checkpoint {list(ckpt)}, config expects {list(want)})"
                      for name, ckpt, want in info.get("mismatched_keys") or ()]
        problems = [
            f"{kind} tensors: {sorted(names)}"
            for kind, names in (("missing", info.get("missing_keys")), ("unexpected", info.get("unexpected_keys")),
                                ("mis-shaped", mismatched))
            if names
        ]
        if problems:
            raise ValueError(f"checkpoint {args[0] if args else ''!s} does not match its config: " + "; ".join(problems))
        return (model, info) if want_info else model


class UniPoolModel(UniPoolPreTrainedModel):
    def __init__(self, config: UniPoolConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pools = nn.ModuleList(
            ExpertPool(config.num_experts, config.hidden_size, config.expert_intermediate_size)
            for _ in range(config.num_pools)
        )
        self.routers = nn.ModuleList(PoolRouter(config, trainable=True) for _ in range(config.num_routers))
        self.layers = nn.ModuleList(
            UniPoolDecoderLayer(config, l, self.pools[config.layer_to_pool(l)], self.routers[config.layer_to_router(l)])
            for l in range(config.num_hidden_layers)
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, steering_bias=None, steering_mask=None, expert_budget=None,
                **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past).unsqueeze(0)
        causal_mask = create_causal_mask(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            past_key_values=past_key_values, position_ids=position_ids,
        )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        steering = steering_view(steering_bias, steering_mask, inputs_embeds.shape[:2], self.config, expert_budget)
        hidden, all_logits = inputs_embeds, []
        for layer in self.layers:
            hidden, router_logits = layer(hidden, position_embeddings, causal_mask, past_key_values, steering, **kwargs)
            all_logits.append(router_logits)
        return self.norm(hidden), past_key_values, tuple(all_logits)


def steering_view(bias, mask, batch_seq: tuple[int, int], config: UniPoolConfig,
                  budget=None) -> SteeringView | None:
    """Per-sequence [B, L, E] or per-token [B, S, L, E] steering as the engine's table form:
    token t reads row t + 1 of a [T + 1, L, E] table (row 0 stays zero), so the reference
    routes through exactly the function the engine uses. `budget`: experts per token, an int,
    [B] (per sequence) or [B, S] (per token), or None (the full top-k)."""
    if bias is None and mask is None and budget is None:
        return None
    batch, seq = batch_seq
    layers, experts = config.num_hidden_layers, config.num_experts
    given = [t for t in (bias, mask, budget) if isinstance(t, torch.Tensor)]
    device = given[0].device if given else torch.device("cpu")

    def rows(t, name, dtype):
        table = torch.zeros(batch * seq + 1, layers, experts, dtype=dtype, device=device)
        if t is None:
            return table
        if t.dim() not in (3, 4) or tuple(t.shape[-2:]) != (layers, experts):
            raise ValueError(
                f"{name} must have shape [B, {layers}, {experts}] or [B, S, {layers}, {experts}], got {tuple(t.shape)}"
            )
        per_token = t[:, None] if t.dim() == 3 else t  # [B, 1|S, L, E]
        table[1:] = per_token.expand(batch, seq, layers, experts).reshape(-1, layers, experts).to(dtype)
        return table

    index = torch.arange(1, batch * seq + 1, dtype=torch.int32, device=device)
    top_k = None
    if budget is not None:
        per_token = torch.as_tensor(budget, dtype=torch.int32, device=device)
        per_token = per_token.view(-1, 1) if per_token.dim() == 1 else per_token  # [B, 1|S] or a scalar
        top_k = per_token.expand(batch, seq).reshape(-1).contiguous()
    return SteeringView(index, rows(bias, "steering_bias", torch.float32), rows(mask, "steering_mask", torch.int8),
                        top_k)


class UniPoolForCausalLM(UniPoolPreTrainedModel, GenerationMixin):
    """Causal LM over shared expert pools; `steering_bias`/`steering_mask` steer its routers.

    steering_bias: [B, L, E] or [B, S, L, E] fp32, alpha already applied (MASCing,
    per-token sigma); steering_mask: same shapes, int8 +1 include / -1 exclude;
    expert_budget: experts per token (an int, [B] or [B, S]; kernels/routing_reference.py).
    See kernels/routing_reference.py for exactly where each enters the routing.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: UniPoolConfig):
        super().__init__(config)
        self.model = UniPoolModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def set_experts_fn(self, fn: ExpertsFn) -> None:
        """Swap the expert computation (torch reference by default), e.g. for a Triton kernel."""
        for layer in self.model.layers:
            layer.moe.experts_fn = fn

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                steering_bias=None, steering_mask=None, expert_budget=None, output_router_logits=False, **kwargs):
        hidden, past_key_values, router_logits = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            steering_bias=steering_bias, steering_mask=steering_mask, expert_budget=expert_budget, **kwargs,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)
        if output_router_logits:
            out["router_logits"] = router_logits  # per layer: [T, E] fp32
        return out
