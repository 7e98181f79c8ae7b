"""Steering installed on a loaded vLLM model of one of its own MoE families (steering/families.py).

vLLM's model code and its fused MoE kernels stay in charge; two seams per MoE layer:

  the gate's output   a forward hook on the module that returns the router logits (its
                      parameter names, `gate.weight` and DeepSeek's `gate.e_score_correction_bias`,
                      are untouched, so weight loading is vLLM's own). It rewrites each token's
                      logits with its row (kernels/routing_reference.steer_router_logits), before
                      vLLM selects experts, wherever the gate runs: in the model's MoE block
                      (Mixtral, Qwen2-MoE, OLMoE, Phi-MoE, gpt-oss) or inside FusedMoE's runner
                      (Qwen3-MoE and DeepSeek pass `gate=` to it).
  the layer's router  `select_experts` of the FusedMoE layer's router object (an instance
                      attribute; the class is untouched): counts the chosen experts, applies the
                      routed budget (a routed scale of 0 zeroes the routed gates, the MoE kernel
                      still computes those experts), and, for grouped top-k kinds only, replaces
                      steered tokens' selection with kernels/routing_reference.grouped_select.
                      Unsteered tokens keep vLLM's own selection, bit for bit.

Both read the table's view, which is empty while a step nobody steers runs: such steps run
the model's decoder stack compiled a second time without them (steering/idle_steps.py).
Installed only by the steering worker (SteeringWorker.load_model), so an engine without that
worker serves exactly as vLLM does. Not covered: monolithic MoE kernels that take the logits
and never call the router (some quantised GPU paths: the logit transform still applies, the
counts, the routed budget and grouped selection do not), expert-parallel load balancing
(EPLB: counts would be of physical experts), sequence-parallel MoE (the gate then sees a
chunk of the step's tokens), and gpt-oss on ROCm (its router GEMM bypasses the module).
"""

from __future__ import annotations

import logging

import torch

from unipool_serve.kernels.routing_reference import grouped_select, steer_router_logits

from ..routing_counts import RoutingCounts
from ..settings import setting
from .families import Family, family_of
from .idle_steps import IdleSteps
from .shape import SteerableModel
from .table import SteeringTable

logger = logging.getLogger("unipool_serve.worker")


class GateHook:
    """Forward hook on one layer's gate: steered logits out (a tensor, or the first of a tuple)."""

    def __init__(self, table: SteeringTable, layer: int):
        self.table, self.layer = table, layer

    def __call__(self, module, args, output):
        logits = output[0] if isinstance(output, tuple) else output  # [T, E]
        view = self.table.view(logits.shape[0])
        if view is None:
            return None
        rows = view.index.long()
        steered = steer_router_logits(logits, view.bias[rows, self.layer], view.mask[rows, self.layer])
        return (steered, *output[1:]) if isinstance(output, tuple) else steered


def grouped_rule(router) -> dict:
    """grouped_select's constants, read from vLLM's router object (CPURouter, GroupedTopKRouter; a
    router vLLM chose because the grouping is degenerate has no group fields: one group)."""
    return dict(top_k=router.top_k, num_groups=getattr(router, "num_expert_group", None) or 1,
                topk_groups=getattr(router, "topk_group", None) or 1, scoring=router.scoring_func,
                correction_bias=getattr(router, "e_score_correction_bias", None),
                renormalize=router.renormalize, scaling=router.routed_scaling_factor)


class RouterTap:
    """Wraps one FusedMoE router's `select_experts` (see the module doc)."""

    def __init__(self, router, table: SteeringTable, counts: RoutingCounts, layer: int, grouped: bool):
        self.table, self.counts, self.layer = table, counts, layer
        self.rule = grouped_rule(router) if grouped else None  # None: vLLM's selection already honours the logits
        self.renormalize = bool(getattr(router, "renormalize", False))
        original = router.select_experts

        def select_experts(hidden_states, router_logits, topk_indices_dtype=None, **kwargs):
            weights, ids = original(hidden_states, router_logits, topk_indices_dtype, **kwargs)
            return self.after(router_logits, weights, ids)

        router.select_experts = select_experts  # instance attribute: this layer's router only

    def after(self, logits: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
        view = self.table.view(logits.shape[0])
        if view is not None:
            rows = view.index.long()  # [T]
            if self.rule is not None:
                w, i = grouped_select(logits, view.mask[rows, self.layer], **self.rule)
                steered = (rows != 0)[:, None]
                weights = torch.where(steered, w.to(weights.dtype), weights)
                ids = torch.where(steered, i.to(ids.dtype), ids)
            weights, counted = self.budget(view.budget, weights, ids)
        else:
            counted = ids
        self.counts.record(self.layer, counted)
        return weights, ids

    def budget(self, budget: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
        """Slots past each token's expert budget get weight 0 (vLLM's kernels still compute them:
        its kernels have no "dropped" id); the kept ones are renormalised where the router does.
        Returns (weights, ids for the counts: the dropped slots as E, which is not counted)."""
        dropped = torch.arange(ids.shape[1], device=ids.device) >= budget.to(ids.device).view(-1, 1)  # [T, k]
        kept = weights.masked_fill(dropped, 0)
        if self.renormalize:
            budgeted = dropped.any(dim=-1, keepdim=True)
            kept = torch.where(budgeted, kept / kept.sum(dim=-1, keepdim=True).clamp_min(1e-20), kept)
        return kept, ids.masked_fill(dropped, self.counts.counts.shape[1])


def attach(model: torch.nn.Module, vllm_config) -> Family:
    """Give a loaded vLLM model of a supported family `steering` and `routing_counts`, and steer it."""
    hf_config = vllm_config.model_config.hf_config
    family, shape = family_of(hf_config), SteerableModel.of(hf_config)
    device = next(model.parameters()).device
    model.steering = SteeringTable.for_model(vllm_config, shape.num_layers, shape.num_experts, shape.top_k).to(device)
    model.routing_counts = RoutingCounts(shape.num_layers, shape.num_experts,
                                         setting("UNIPOOL_ROUTING_STATS")).to(device)
    grouped = family.router_kind(hf_config).grouped
    hooked = 0
    for layer_index, layer in enumerate(model.model.layers):
        block = getattr(layer, family.block, None)
        if layer_index in shape.dense_layers or block is None:  # dense, or another pipeline stage's layer
            continue
        getattr(block, family.gate).register_forward_hook(GateHook(model.steering, layer_index))
        RouterTap(block.experts.router, model.steering, model.routing_counts, layer_index, grouped)
        if getattr(block.experts, "is_monolithic", False):
            logger.warning("layer %d: vLLM chose a monolithic MoE kernel, which never calls the router: its logits "
                           "are steered, but routing counts, routed budgets and grouped selection do not apply",
                           layer_index)
        hooked += 1
    # steps nobody steers run the decoder stack compiled without the hooks' steering (idle_steps.py)
    model.idle_steps = IdleSteps.route_calls_of(model.model, model.steering, vllm_config)
    logger.info("steering %s: %d MoE layers hooked (router kind %s, dense layers %s)", shape.architecture, hooked,
                shape.router_kind, list(shape.dense_layers))
    return family
