"""vLLM model class for shared-pool MoE checkpoints (`architectures: ["UniPoolForCausalLM"]`).

Shape legend: T tokens of the step, H hidden, E experts per pool, k experts per
token, F expert width. Pools (`model.pools.{p}`) and routers (`model.routers.{r}`)
are owned once by the model; each decoder layer keeps plain references to the
pool and router it uses, so parameter names never repeat and every layer of a
pool hands the same storage to the MoE kernel.
"""

# No `from __future__ import annotations`: vLLM reads forward() annotations at runtime.

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice

import torch
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import (
    get_pp_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    extract_layer_index,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.platforms import current_platform
from vllm.sequence import IntermediateTensors

from .checkpoint_loading import load_checkpoint
from .config import UniPoolConfig
from .expert_pool import ExpertPool
from .moe_backend import MoEBackend, select_backend
from .router import PoolRouter
from .routing_capture import RoutingCapture
from .routing_counts import RoutingCounts
from .settings import setting
from .steering.idle_steps import IdleSteps
from .steering.table import SteeringTable, max_step_tokens


# vLLM's expert parallelism shards each FusedMoE layer's own experts across ranks and
# dispatches that layer's tokens all-to-all (EPLB rebalances per layer); a shared pool is one
# expert set for many layers, which that machinery does not model. Refused, never ignored.
EXPERT_PARALLEL_REFUSED = ("--enable-expert-parallel is not supported for shared expert pools (UniPool, grouped "
                           "pools): shard pools with tensor parallelism (--tensor-parallel-size) instead")


class UniPoolAttention(nn.Module):
    """LLaMA attention: fused QKV, RoPE, paged attention, output projection (no biases)."""

    def __init__(self, config: UniPoolConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads // tp_size
        self.num_kv_heads = max(1, config.num_key_value_heads // tp_size)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, config.num_attention_heads, config.num_key_value_heads,
            bias=False, prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=False, prefix=f"{prefix}.o_proj"
        )
        self.rotary_emb = get_rope(
            self.head_dim, max_position=config.max_position_embeddings, rope_parameters=config.rope_parameters
        )
        self.attn = Attention(
            self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=self.num_kv_heads,
            cache_config=vllm_config.cache_config, prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class SharedExpertMLP(nn.Module):
    """The optional always-on dense SwiGLU expert; its partial sum is reduced with the pool's."""

    def __init__(self, hidden_size: int, width: int, prefix: str):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [width, width], bias=False, prefix=f"{prefix}.gate_up_proj"
        )
        self.down_proj = RowParallelLinear(
            width, hidden_size, bias=False, reduce_results=False, prefix=f"{prefix}.down_proj"
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.act_fn(gate_up))
        return out


@dataclass(frozen=True)
class ModelParts:
    """What the model owns once and every layer reads: pools, routers, the MoE backend, the
    steering table, the routing counts and the routing capture. Layers keep plain references."""

    config: UniPoolConfig
    pools: nn.ModuleList  # [P] ExpertPool (PPMissingLayer where no local layer uses it)
    routers: nn.ModuleList  # [R] PoolRouter, built with the backend's routing function
    backend: MoEBackend
    steering: SteeringTable
    routing_counts: RoutingCounts
    routing_capture: RoutingCapture


class UniPoolMoE(nn.Module):
    """One layer's MoE: its (tied) router's top-k over its (shared) pool, + shared expert."""

    def __init__(self, layer_idx: int, parts: ModelParts, shared_expert: SharedExpertMLP | None):
        super().__init__()
        config = parts.config
        self.layer_idx, self.backend = layer_idx, parts.backend
        # Plain references (not submodules): the model owns pools, routers, the steering table
        # and the routing counts once; the decoder layer owns its shared expert.
        self.__dict__.update(pool=parts.pools[config.layer_to_pool(layer_idx)],
                             router=parts.routers[config.layer_to_router(layer_idx)],
                             steering=parts.steering, routing_counts=parts.routing_counts,
                             routing_capture=parts.routing_capture, shared_expert=shared_expert)
        self.tp_size = get_tensor_model_parallel_world_size()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # The step's steering rows are read here, like vLLM's LoRA reads its per-token index:
        # the layers keep vLLM's own forward signature.
        steering = self.steering.view(hidden_states.shape[0])
        logits = self.router.logits(hidden_states)  # [T, E] fp32
        topk_ids, topk_weights = self.router.route(logits, self.layer_idx, steering)  # [T, k]
        self.routing_counts.record(self.layer_idx, topk_ids)
        self.routing_capture.record(self.layer_idx, topk_ids, logits)
        # [T, H], this rank's F slice; slots are dropped (id E) only by budgets, in a step that holds one
        may_drop = steering is not None and steering.budget is not None
        out = self.backend(hidden_states, self.pool, topk_ids, topk_weights, may_drop=may_drop)
        if self.shared_expert is not None:
            out = out + self.shared_expert(hidden_states)
        if self.tp_size > 1:
            out = tensor_model_parallel_all_reduce(out)
        return out


class UniPoolDecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, prefix: str, parts: ModelParts):
        super().__init__()
        config = parts.config
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = UniPoolAttention(config, vllm_config, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        width = config.shared_expert_intermediate_size
        self.shared_expert = SharedExpertMLP(config.hidden_size, width, f"{prefix}.shared_expert") if width else None
        self.moe = UniPoolMoE(extract_layer_index(prefix), parts, self.shared_expert)

    def forward(self, positions, hidden_states, residual):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.moe(hidden_states), residual


@support_torch_compile
class UniPoolModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: UniPoolConfig = vllm_config.model_config.hf_config
        self.config = config
        if vllm_config.parallel_config.enable_expert_parallel:
            raise ValueError(EXPERT_PARALLEL_REFUSED)
        dtype = vllm_config.model_config.dtype
        self.moe_backend = select_backend(current_platform.device_type, dtype, config.hidden_size)
        tp_rank, tp_size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()

        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   prefix=f"{prefix}.embed_tokens")
        self.steering = SteeringTable.for_model(vllm_config, config.num_hidden_layers, config.num_experts,
                                                config.num_experts_per_tok)
        self.routing_counts = RoutingCounts(config.num_hidden_layers, config.num_experts,
                                            setting("UNIPOOL_ROUTING_STATS"))
        self.routing_capture = RoutingCapture(max_step_tokens(vllm_config), config.num_hidden_layers,
                                              config.num_experts, config.num_experts_per_tok,
                                              setting("UNIPOOL_ROUTING_CAPTURE"))
        # This pipeline stage's layers; pools and routers no local layer uses are placeholders.
        from vllm.distributed.utils import get_pp_indices
        start, end = get_pp_indices(config.num_hidden_layers, get_pp_group().rank_in_group,
                                    get_pp_group().world_size)
        used_pools = {config.layer_to_pool(l) for l in range(start, end)}
        used_routers = {config.layer_to_router(l) for l in range(start, end)}
        self.pools = nn.ModuleList(
            ExpertPool(config.num_experts, config.hidden_size, config.expert_intermediate_size,
                       tp_rank=tp_rank, tp_size=tp_size, pad_to=self.moe_backend.pad_to, dtype=dtype)
            if p in used_pools else PPMissingLayer()
            for p in range(config.num_pools)
        )
        self.routers = nn.ModuleList(
            PoolRouter(config, route_fn=self.moe_backend.route) if r in used_routers else PPMissingLayer()
            for r in range(config.num_routers)
        )
        parts = ModelParts(config, self.pools, self.routers, self.moe_backend, self.steering, self.routing_counts,
                           self.routing_capture)
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers, lambda prefix: UniPoolDecoderLayer(vllm_config, prefix, parts),
            prefix=f"{prefix}.layers",
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
        else:
            hidden_states = intermediate_tensors["hidden_states"]
            residual = intermediate_tensors["residual"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class UniPoolForCausalLM(nn.Module, SupportsPP):
    """vLLM entry class. Steering seam: `self.steering` (steering/table.py), read only by steps that need it
    (steering/idle_steps.py); statistics: `self.routing_counts`."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: UniPoolConfig = vllm_config.model_config.hf_config
        self.config = config
        self.model = UniPoolModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        # what a step without a steered token or a captured request runs
        self.idle_steps = IdleSteps(self.model, self.model.steering, self.model.routing_capture, vllm_config)
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    @property
    def steering(self) -> SteeringTable:
        return self.model.steering

    @property
    def routing_counts(self) -> RoutingCounts:
        return self.model.routing_counts

    @property
    def routing_capture(self) -> RoutingCapture:
        return self.model.routing_capture

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor | IntermediateTensors:
        return self.idle_steps(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_checkpoint(self, weights)

    def process_weights_after_loading(self) -> None:
        """Called once by vLLM's loader after all weights (or dummy weights) are in place."""
        for pool in self.model.pools:
            if isinstance(pool, ExpertPool) and pool.packed_by is None:
                self.model.moe_backend.prepare(pool)
