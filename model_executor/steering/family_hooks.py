"""Steering installed on a loaded vLLM model of one of its own MoE families (steering/families.py).

vLLM's model code and its fused MoE kernels stay in charge; two seams per MoE layer:

  the gate's output   a forward hook on the module that returns the router logits (its
                      parameter names, `gate.weight` and DeepSeek's `gate.e_score_correction_bias`,
                      are untouched, so weight loading is vLLM's own). It captures the raw logits
                      (per-request routing capture) and rewrites each token's
                      logits with its row (kernels/routing_reference.steer_router_logits), before
                      vLLM selects experts, wherever the gate runs: in the model's MoE block
                      (Mixtral, Qwen2-MoE, OLMoE, Phi-MoE, gpt-oss) or inside FusedMoE's runner
                      (Qwen3-MoE and DeepSeek pass `gate=` to it).
  the layer's router  `select_experts` of the FusedMoE layer's router object (an instance
                      attribute; the class is untouched): counts and captures the chosen experts,
                      applies the routed budget (each token keeps its heaviest slots; the others
                      get gate 0, the MoE kernel still computes them), and, for grouped top-k kinds only, replaces
                      steered tokens' selection with kernels/routing_reference.grouped_select.
                      Unsteered tokens keep vLLM's own selection, bit for bit.

Both read the table's view, which is empty, and record nothing, while a step nobody steers
or captures runs: such steps run the model's decoder stack compiled a second time without
them (steering/idle_steps.py), the routing counts alone left in the router tap.
Installed only by the steering worker (SteeringWorker.load_model), so an engine without that
worker serves exactly as vLLM does. Not covered: monolithic MoE kernels that take the logits
and never call the router (some quantised GPU paths, vLLM's int4 CPU kernels: the logit
transform still applies, the counts, the routed budget, grouped selection and routing capture
do not; capture is then refused), expert-parallel load balancing
(EPLB: counts would be of physical experts), sequence-parallel MoE (the gate then sees a
chunk of the step's tokens), and gpt-oss on ROCm (its router GEMM bypasses the module).
"""

from __future__ import annotations

import logging

import torch

from unipool_serve.kernels.routing_reference import grouped_select, steer_router_logits

from ..routing_capture import RoutingCapture
from ..routing_counts import RoutingCounts
from ..settings import setting
from .families import Family, family_of
from .idle_steps import IdleSteps
from .shape import SteerableModel
from .table import SteeringTable, max_step_tokens

logger = logging.getLogger("unipool_serve.worker")


class GateHook:
    """Forward hook on one layer's gate: the raw logits captured, steered logits out (a tensor, or the
    first of a tuple)."""

    def __init__(self, table: SteeringTable, layer: int, capture: RoutingCapture | None = None, row: int = 0):
        self.table, self.layer = table, layer
        self.capture, self.row = capture, row  # the layer's row in the capture buffers

    def __call__(self, module, args, output):
        logits = output[0] if isinstance(output, tuple) else output  # [T, E]
        if self.capture is not None:
            self.capture.record_logits(self.row, logits)  # as the router computed them, before steering
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

    def __init__(self, router, table: SteeringTable, counts: RoutingCounts, layer: int, grouped: bool,
                 capture: RoutingCapture | None = None, row: int = 0):
        self.table, self.counts, self.layer = table, counts, layer
        self.capture, self.row = capture, row
        self.rule = grouped_rule(router) if grouped else None  # None: vLLM's selection already honours the logits
        self.renormalize = bool(getattr(router, "renormalize", False))
        original = router.select_experts

        def select_experts(hidden_states, router_logits, topk_indices_dtype=None, **kwargs):
            weights, ids = original(hidden_states, router_logits, topk_indices_dtype, **kwargs)
            return self.after(router_logits, weights, ids)

        router.select_experts = select_experts  # instance attribute: this layer's router only

    def after(self, logits: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
        view = self.table.view(logits.shape[0])
        if view is not None and self.rule is not None:
            rows = view.index.long()  # [T]
            w, i = grouped_select(logits, view.mask[rows, self.layer], **self.rule)
            steered = (rows != 0)[:, None]
            weights = torch.where(steered, w.to(weights.dtype), weights)
            ids = torch.where(steered, i.to(ids.dtype), ids)
        counted = ids
        if view is not None and view.budget is not None:  # a step that holds a budget
            weights, counted = self.budget(view.budget, weights, ids)
        self.counts.record(self.layer, counted)
        if self.capture is not None:
            self.capture.record_ids(self.row, counted)  # the routing used: steered, budgeted (dropped = E)
        return weights, ids

    def budget(self, budget: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
        """Each token keeps its `budget` heaviest slots; the others get weight 0 (vLLM's kernels still
        compute them: its kernels have no "dropped" id); where the router renormalises, the kept ones are
        renormalised to the sum the router gave all k (1, or DeepSeek's routed_scaling_factor, which vLLM's
        CPU router folds into the weights). vLLM's CPU router takes its top-k unsorted, so slots are ranked
        by weight, not position. Returns (weights, ids for the counts: the dropped slots as E, which is not
        counted)."""
        rank = weight_rank(weights)
        dropped = rank >= budget.to(ids.device).view(-1, 1)  # [T, k]
        kept = weights.masked_fill(dropped, 0)
        if self.renormalize:
            budgeted = dropped.any(dim=-1, keepdim=True)
            total = weights.sum(dim=-1, keepdim=True)
            kept = torch.where(budgeted, kept * (total / kept.sum(dim=-1, keepdim=True).clamp_min(1e-20)), kept)
        return kept, ids.masked_fill(dropped, self.counts.counts.shape[1])


def weight_rank(weights: torch.Tensor) -> torch.Tensor:
    """[T, k] -> [T, k]: each slot's place by weight, 0 the heaviest, ties to the earlier slot (what
    a stable descending argsort's inverse gives). Counted by comparing the k slots pairwise: for the
    small k of a router, elementwise ops that a compiled step fuses, where two sorts are two calls."""
    slot = torch.arange(weights.shape[-1], device=weights.device)
    earlier = slot[None, :] < slot[:, None]  # [i, j]: slot j comes before slot i
    w_i, w_j = weights[:, :, None], weights[:, None, :]
    return ((w_j > w_i) | ((w_j == w_i) & earlier)).sum(dim=-1)


def attach(model: torch.nn.Module, vllm_config) -> Family:
    """Give a loaded vLLM model of a supported family `steering`, `routing_counts` and `routing_capture`,
    and steer it."""
    hf_config = vllm_config.model_config.hf_config
    family, shape = family_of(hf_config), SteerableModel.of(hf_config)
    device = next(model.parameters()).device
    model.steering = SteeringTable.for_model(vllm_config, shape.num_layers, shape.num_experts, shape.top_k).to(device)
    model.routing_counts = RoutingCounts(shape.num_layers, shape.num_experts,
                                         setting("UNIPOOL_ROUTING_STATS")).to(device)
    blocks = {l: getattr(layer, family.block, None) for l, layer in enumerate(model.model.layers)}
    hooked = [l for l, block in blocks.items() if l not in shape.dense_layers and block is not None]  # this stage's
    monolithic = [l for l in hooked if getattr(blocks[l].experts, "is_monolithic", False)]
    if monolithic:
        logger.warning("layers %s: vLLM chose a monolithic MoE kernel, which never calls the router: their logits "
                       "are steered, but routing counts, routed budgets, grouped selection and routing capture do "
                       "not apply", monolithic)
    capture = setting("UNIPOOL_ROUTING_CAPTURE") and not monolithic
    model.routing_capture = RoutingCapture(max_step_tokens(vllm_config), len(hooked), shape.num_experts, shape.top_k,
                                           capture, layers=tuple(hooked)).to(device)
    grouped = family.router_kind(hf_config).grouped
    for row, layer_index in enumerate(hooked):
        block = blocks[layer_index]
        getattr(block, family.gate).register_forward_hook(
            GateHook(model.steering, layer_index, model.routing_capture, row))
        RouterTap(block.experts.router, model.steering, model.routing_counts, layer_index, grouped,
                  model.routing_capture, row)
    # steps nobody steers or captures run the decoder stack compiled without the hooks' seams (idle_steps.py)
    model.idle_steps = IdleSteps.route_calls_of(model.model, model.steering, model.routing_capture, vllm_config)
    logger.info("steering %s: %d MoE layers hooked (router kind %s, dense layers %s, routing capture %s)",
                shape.architecture, len(hooked), shape.router_kind, list(shape.dense_layers), "on" if capture else "off")
    return family
