"""MoE backends: the one place that chooses the kernels a model runs, for routing and experts.

Chosen once per model by UNIPOOL_MOE_BACKEND (see docs/vllm-plugin.md); each backend
owns both halves of a layer's MoE:
  route(logits, steering, layer, spec, scale) -> (topk_ids, topk_weights)
  __call__(hidden, pool, topk_ids, topk_weights) -> hidden

  backend      routing                         experts
  triton       Triton fused_route              our Triton fused_pool_moe (CUDA default)
  vllm-triton  Triton fused_route              vLLM's Triton `fused_experts`
  cpu          torch route_with_table          vLLM's `cpu_fused_moe` over pools prepacked once
                                               after loading (F padded to 32; fp32/bf16/fp16)
  torch        torch route_with_table          kernels/moe_reference.pool_moe (a registered
                                               custom op: one opaque call to torch.compile)

Dropped slots (id E, a per-token expert budget) are skipped, never computed with weight 0:
the Triton kernel and pool_moe skip them themselves; vLLM's `fused_experts` gets an expert
map sending E to -1 (its "not on this rank" id); `cpu_fused_moe` has no such id, so a step
with dropped slots runs only the kept (token, slot) pairs, one row each with top-k 1, and
adds the rows back per token (`unipool::cpu_pool_moe`, an opaque custom op: its shapes
depend on the routing). Whether a step has dropped slots is looked at only where one can
have them (`may_drop`: a step that holds an expert budget, which runs a compiled variant of
its own, steering/idle_steps.py), so a step without a budget, steered or not, reads nothing
back per layer.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch

from unipool_serve.kernels.moe_reference import pool_moe
from unipool_serve.kernels.routing_reference import route_with_table
from unipool_serve.kernels.routing_spec import RouteFn

from .expert_pool import ExpertPool
from .settings import parse_setting, setting

logger = logging.getLogger(__name__)

BACKEND_ENV = "UNIPOOL_MOE_BACKEND"
CPU_ALIGN = 32  # cpu_fused_moe tiles hidden and expert width in blocks of 32


class MoEBackend(Protocol):
    """Both halves of a layer's MoE on one platform (see the module doc)."""

    name: str
    pad_to: int  # the pools' expert width is padded to a multiple of this (zeros)
    route: RouteFn  # the routers' routing function (PoolRouter is built with it)

    def prepare(self, pool: ExpertPool) -> None:
        """Once, after loading: repack the pool's weights for the kernel (sets pool.packed_by)."""

    def __call__(self, hidden: torch.Tensor, pool: ExpertPool, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor, may_drop: bool = True) -> torch.Tensor:
        """hidden [T, H], ids/weights [T, k] -> [T, H] (this rank's slice of the expert width);
        may_drop: some id may be E (a dropped slot)."""


@torch.library.custom_op("unipool::pool_moe", mutates_args=())
def _pool_moe_op(hidden: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                 topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    return pool_moe(hidden, w_gate_up, w_down, topk_ids, topk_weights)


@_pool_moe_op.register_fake
def _(hidden, w_gate_up, w_down, topk_ids, topk_weights):
    return torch.empty_like(hidden)


class TorchBackend:
    name = "torch"
    pad_to = 1
    route = staticmethod(route_with_table)

    def prepare(self, pool: ExpertPool) -> None:
        pool.packed_by = self.name

    def __call__(self, hidden, pool: ExpertPool, topk_ids, topk_weights, may_drop: bool = True) -> torch.Tensor:
        return torch.ops.unipool.pool_moe(hidden, pool.gate_up_proj, pool.down_proj, topk_ids, topk_weights)


@torch.library.custom_op("unipool::cpu_pool_moe", mutates_args=())
def _cpu_pool_moe_op(hidden: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                     topk_ids: torch.Tensor, topk_weights: torch.Tensor, isa: str, may_drop: bool) -> torch.Tensor:
    from vllm._custom_ops import cpu_fused_moe

    num_experts = w_gate_up.shape[0]  # prepacked pools keep the expert dimension first
    hidden = hidden.contiguous()
    dropped = topk_ids >= num_experts if may_drop else None  # [T, k]
    if dropped is not None and bool(dropped.any()):
        tokens, slots = (~dropped).nonzero(as_tuple=True)  # [S_kept] each
        rows = hidden[tokens]  # [S_kept, H]: one row per kept (token, slot), top-k 1
        partial = torch.empty_like(rows)
        if rows.shape[0]:
            cpu_fused_moe(partial, rows, w_gate_up, w_down, None, None,
                          topk_weights[tokens, slots].unsqueeze(1).contiguous(),
                          topk_ids[tokens, slots].unsqueeze(1).contiguous(), "silu", isa, False)
        return torch.zeros_like(hidden).index_add_(0, tokens, partial)
    out = torch.empty_like(hidden)  # [T, H]
    cpu_fused_moe(out, hidden, w_gate_up, w_down, None, None, topk_weights, topk_ids, "silu", isa, False)
    return out


@_cpu_pool_moe_op.register_fake
def _(hidden, w_gate_up, w_down, topk_ids, topk_weights, isa, may_drop):
    return torch.empty_like(hidden)


class CpuBackend:
    """vLLM's CPU grouped GEMM; `amx` only with AMX tiles and bf16, `vec` otherwise."""

    name = "cpu"
    pad_to = CPU_ALIGN
    route = staticmethod(route_with_table)

    def __init__(self, dtype: torch.dtype):
        amx = torch.cpu._is_amx_tile_supported() and dtype == torch.bfloat16
        self.isa = "amx" if amx else "vec"

    def prepare(self, pool: ExpertPool) -> None:
        from vllm._custom_ops import cpu_prepack_moe_weight

        for param in (pool.gate_up_proj, pool.down_proj):
            # Rebinding .data drops the only reference to the unpacked copy.
            param.data = cpu_prepack_moe_weight(param.data.contiguous(), self.isa)
        pool.packed_by = f"{self.name}:{self.isa}"

    def __call__(self, hidden, pool: ExpertPool, topk_ids, topk_weights, may_drop: bool = True) -> torch.Tensor:
        if may_drop:  # shapes that depend on the routing: one opaque call
            return torch.ops.unipool.cpu_pool_moe(hidden, pool.gate_up_proj, pool.down_proj, topk_ids, topk_weights,
                                                  self.isa, may_drop)
        # no dropped slot possible: vLLM's kernel straight in the graph, as its own FusedMoE calls it (the
        # custom op's Python wrapper cost ~25 us per layer on CPU, a sixth of a tiny decode step)
        from vllm._custom_ops import cpu_fused_moe

        out = torch.empty_like(hidden)
        cpu_fused_moe(out, hidden.contiguous(), pool.gate_up_proj, pool.down_proj, None, None, topk_weights, topk_ids,
                      "silu", self.isa, False)
        return out


def _fused_route(*args, **kwargs):
    from unipool_serve.kernels.routing import fused_route

    return fused_route(*args, **kwargs)


class VllmTritonBackend:
    name = "vllm-triton"
    pad_to = 1
    route = staticmethod(_fused_route)
    _expert_map: torch.Tensor | None = None

    def prepare(self, pool: ExpertPool) -> None:
        pool.packed_by = self.name

    def __call__(self, hidden, pool: ExpertPool, topk_ids, topk_weights, may_drop: bool = True) -> torch.Tensor:
        from vllm.model_executor.layers.fused_moe import fused_experts

        num_experts = pool.num_experts
        if self._expert_map is None or self._expert_map.device != hidden.device:
            # E (a dropped slot) -> -1, vLLM's "expert not on this rank": never computed
            self._expert_map = torch.cat([torch.arange(num_experts, dtype=torch.int32),
                                          torch.tensor([-1], dtype=torch.int32)]).to(hidden.device)
        return fused_experts(hidden, pool.gate_up_proj, pool.down_proj, topk_weights, topk_ids,
                             global_num_experts=num_experts + 1, expert_map=self._expert_map)


class TritonBackend(VllmTritonBackend):
    name = "triton"

    def __init__(self):
        from unipool_serve.kernels import launch_config
        from unipool_serve.kernels.fused_moe import fused_pool_moe

        self._kernel = fused_pool_moe
        if (folder := setting("UNIPOOL_MOE_CONFIG_DIR")) is not None:
            launch_config.use_config_dir(folder)

    def __call__(self, hidden, pool: ExpertPool, topk_ids, topk_weights, may_drop: bool = True) -> torch.Tensor:
        return self._kernel(hidden, pool.gate_up_proj, pool.down_proj, topk_ids, topk_weights)


def select_backend(device_type: str, dtype: torch.dtype, hidden_size: int, name: str | None = None) -> MoEBackend:
    """The backend named by UNIPOOL_MOE_BACKEND (or `name`), else the platform default."""
    name = setting(BACKEND_ENV) if name is None else parse_setting(BACKEND_ENV, name)
    if name is None:
        name = "triton" if device_type == "cuda" else "cpu" if device_type == "cpu" else "torch"
    if name in ("triton", "vllm-triton") and device_type != "cuda":
        raise ValueError(f"{BACKEND_ENV}={name!r} needs a CUDA device; this model runs on {device_type!r}")
    if name == "cpu" and device_type != "cpu":
        raise ValueError(f"{BACKEND_ENV}='cpu' needs the CPU platform; this model runs on {device_type!r}")
    if name == "cpu":
        if dtype not in (torch.float32, torch.bfloat16, torch.float16) or hidden_size % CPU_ALIGN:
            logger.warning("cpu_fused_moe needs fp32/bf16/fp16 and hidden %% %d == 0 (got %s, %d): "
                           "using the torch backend", CPU_ALIGN, dtype, hidden_size)
            return TorchBackend()
        return CpuBackend(dtype)
    if name == "triton":
        try:
            return TritonBackend()
        except ImportError:
            logger.info("kernels.fused_moe not available: falling back to vLLM's fused_experts")
            return VllmTritonBackend()
    if name == "vllm-triton":
        return VllmTritonBackend()
    return TorchBackend()
