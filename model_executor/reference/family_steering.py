"""transformers' own MoE models of vLLM's families, steered as the engine steers them (per-token sigma).

The reference the engine tests compare vLLM's families with, and what `unipool-steering fit`
runs offline on a family's folder (tools/fit/family_source.py).

MASCing applies its bias with a forward hook on the gate. transformers 5 computes the router
logits AND selects experts inside one router module, so the hook here is a pair: a forward
pre-hook that enters a torch function mode catching the router's logit projection (its first
F.linear) and returning steered logits (kernels/routing_reference.steer_router_logits: the
same function the engine's gate hook calls), so transformers' own selection runs on them;
and, for grouped top-k routers, a forward hook that replaces the selection with
kernels/routing_reference.grouped_select, as the engine's router tap does. A routed budget of
zero zeroes the output of the block's routed experts (its shared experts still run).

`routing` reads back what each MoE layer's router did, as the engine's routing capture
reports it: the raw logits (before steering) and the experts it chose (after).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from unipool_serve.kernels.routing_reference import grouped_select, steer_router_logits


class _SteerLogits(TorchFunctionMode):
    """Steers the output of the first F.linear it sees (the router's logits [T, E])."""

    def __init__(self, bias_row: torch.Tensor, mask_row: torch.Tensor):
        super().__init__()
        self.bias_row, self.mask_row, self.done = bias_row, mask_row, False
        self.raw: torch.Tensor | None = None  # the logits as the router computed them

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and not self.done:
            self.done = True
            T = out.shape[0]
            self.raw = out.detach().clone()
            out = steer_router_logits(out, self.bias_row.expand(T, -1), self.mask_row.expand(T, -1))
        return out


def routers(model):
    """(layer, router module, MoE block) for every layer with routed experts."""
    for index, layer in enumerate(model.model.layers):
        block = layer.mlp
        router = getattr(block, "gate", None) or getattr(block, "router", None)
        if router is not None and "Router" in type(router).__name__:
            yield index, router, block


def moe_layers(model) -> list[int]:
    """The decoder layers with routed experts, in order: the rows of a routing capture."""
    return [layer for layer, _, _ in routers(model)]


@contextlib.contextmanager
def steered(model, kind: str, bias_rows: torch.Tensor, mask_rows: torch.Tensor, routed_scale: float = 1.0,
            record: dict | None = None, budget: int | None = None):
    """Every token of every forward inside runs under one profile's rows (bias [L, E], mask [L, E]), and
    an expert budget (`budget` slots of each token's top-k kept, as the engine's router tap keeps them).
    `record`, if given, receives {layer: (raw logits [T, E], chosen ids [T, k], their weights [T, k])}
    of the last forward."""
    handles = []
    for layer, router, block in routers(model):
        state = {}

        def pre(module, args, layer=layer, state=state):
            state["mode"] = _SteerLogits(bias_rows[layer].float(), mask_rows[layer])
            state["mode"].__enter__()

        def post(module, args, output, layer=layer, state=state):
            mode = state.pop("mode")
            mode.__exit__(None, None, None)
            if kind.startswith("grouped-"):
                output = _grouped(module, output, mask_rows[layer], kind)
            used = output[2]
            if budget is not None:
                output, used = _budgeted(module, output, budget, mask_rows.shape[1])
            if record is not None:
                record[layer] = (mode.raw, used, output[1])
            return output

        handles += [router.register_forward_pre_hook(pre), router.register_forward_hook(post)]
        if routed_scale != 1.0:
            handles.append(block.experts.register_forward_hook(lambda m, a, out: out * routed_scale))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _grouped(module, output, mask_row: torch.Tensor, kind: str):
    """The router's output with its selection replaced by grouped_select, as the engine's router tap does."""
    logits = output[0]
    weights, ids = grouped_select(
        logits, mask_row.expand(logits.shape[0], -1), top_k=module.top_k, num_groups=module.num_group,
        topk_groups=module.topk_group, scoring="sigmoid" if "sigmoid" in kind else "softmax",
        correction_bias=getattr(module, "e_score_correction_bias", None) if kind.endswith("-bias") else None,
        renormalize=bool(getattr(module, "norm_topk_prob", False)), scaling=module.routed_scaling_factor)
    return logits, weights.to(output[1].dtype), ids.to(output[2].dtype)


def _renormalises(router) -> bool:
    """Whether transformers' router renormalises its top-k weights: Mixtral's and gpt-oss's always (gpt-oss
    takes a softmax over the top-k logits), DeepSeek V1/V2's never, the others by `norm_topk_prob`."""
    name = type(router).__name__
    return name.startswith(("Mixtral", "GptOss")) or bool(getattr(router, "norm_topk_prob", False))


def _budgeted(module, output, budget: int, num_experts: int):
    """(the router's output with each token's `budget` heaviest slots kept, the ids it used): the other
    slots get weight 0 (the model still computes their experts, as vLLM's kernels do) and id E in the
    ids used, as the engine's capture holds a dropped slot; where the router renormalises, the kept ones
    are renormalised to the sum it gave all k (DeepSeek's routed scaling kept; family_hooks.RouterTap.budget)."""
    logits, weights, ids = output
    rank = weights.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # 0 = heaviest
    dropped = rank >= budget
    kept = weights.masked_fill(dropped, 0)
    if _renormalises(module) and dropped.any():
        kept = kept * (weights.sum(dim=-1, keepdim=True) / kept.sum(dim=-1, keepdim=True).clamp_min(1e-20))
    return (logits, kept, ids), ids.masked_fill(dropped, num_experts)


@torch.no_grad()
def logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """[S, V] next-token log-probabilities over a whole sequence (fp64 from fp32 logits)."""
    return torch.log_softmax(model(torch.tensor([token_ids])).logits[0].double(), dim=-1)


@torch.no_grad()
def routing(model, kind: str, token_ids: list[int], bias_rows: torch.Tensor, mask_rows: torch.Tensor,
            budget: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over `token_ids` under the rows and budget: (raw logits [T, R, E], the ids used
    [T, R, k], dropped slots E, their routing weights [T, R, k]), one row R per MoE layer (moe_layers)."""
    record = {}
    with steered(model, kind, bias_rows, mask_rows, record=record, budget=budget):
        model(torch.tensor([token_ids]))
    rows = [record[layer] for layer in sorted(record)]
    return tuple(torch.stack([row[i] for row in rows], dim=1) for i in range(3))
