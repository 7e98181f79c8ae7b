"""Seams nobody uses cost nothing: a step without a steered token, a budget or a request whose routing is
captured runs the same ops per layer as an engine built with UNIPOOL_STEERING=0 and
UNIPOOL_ROUTING_CAPTURE=0, for our own MoE block and for the hooks on vLLM's families (there: plain vLLM's
layer plus the routing counts). Checked on the traced graphs (make_fx), not on a clock; the compiled
engine's side (which variant each step runs, no host read per layer) is
tests/engine/test_idle_seam_engine.py."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from unipool_serve.demo.tiny_model import tiny_config
from unipool_serve.model_executor.expert_pool import ExpertPool
from unipool_serve.model_executor.moe_backend import TorchBackend
from unipool_serve.model_executor.router import PoolRouter
from unipool_serve.model_executor.routing_capture import RoutingCapture
from unipool_serve.model_executor.routing_counts import RoutingCounts
from unipool_serve.model_executor.steering.idle_steps import plain_step
from unipool_serve.model_executor.steering.table import SteeringTable

T = 6


def _ops(fn, *args) -> list[str]:
    graph = make_fx(fn)(*args).graph
    return [str(node.target) for node in graph.nodes if node.op == "call_function"]


def _moe(monkeypatch, steering_on: bool, capture_on: bool = True):
    from unipool_serve.model_executor import vllm_model

    monkeypatch.setattr(vllm_model, "get_tensor_model_parallel_world_size", lambda: 1)
    config = tiny_config(num_experts_per_tok=2)
    table = SteeringTable(16, config.num_hidden_layers, config.num_experts, 2, config.num_experts_per_tok,
                          enabled=steering_on)
    backend = TorchBackend()
    pool = ExpertPool(config.num_experts, config.hidden_size, config.expert_intermediate_size, tp_rank=0, tp_size=1)
    router = PoolRouter(config, route_fn=backend.route)
    nn.init.normal_(router.weight)
    parts = vllm_model.ModelParts(config, nn.ModuleList([pool]), nn.ModuleList([router]), backend, table,
                                  RoutingCounts(config.num_hidden_layers, config.num_experts),
                                  RoutingCapture(16, config.num_hidden_layers, config.num_experts, 2, capture_on))
    return vllm_model.UniPoolMoE(0, parts, shared_expert=None), table, parts.routing_capture


def test_an_idle_step_of_our_moe_block_runs_the_ops_of_an_engine_without_steering_or_capture(monkeypatch):
    hidden = torch.randn(T, tiny_config().hidden_size)
    moe, table, capture = _moe(monkeypatch, steering_on=True)
    steered = _ops(moe, hidden)
    with plain_step(table, capture):  # what the plain variant is traced (and run) with
        idle = _ops(moe, hidden)
    off_moe, _, _ = _moe(monkeypatch, steering_on=False, capture_on=False)  # both seams built off
    assert idle == _ops(off_moe, hidden)
    assert len(steered) > len(idle)  # the tables' reads and the capture's copies are really gone
    assert any("index" in op for op in steered) and not any("std" in op or "var" in op for op in idle)
    assert sum("copy" in op for op in steered) >= 2 + sum("copy" in op for op in idle)  # ids and logits


class _Gate(nn.Module):
    def forward(self, x):
        return x @ torch.ones(x.shape[1], 8)


class _Router:
    top_k, renormalize = 2, True

    def select_experts(self, hidden_states, router_logits, topk_indices_dtype=None, **kwargs):
        weights, ids = torch.softmax(router_logits, -1).topk(2, dim=-1)
        return weights, ids.to(torch.int32)


@pytest.mark.parametrize("grouped", [False, True], ids=["logit-order kinds", "grouped kinds"])
def test_an_idle_step_of_a_family_layer_runs_plain_vllms_ops_and_the_counts(grouped):
    from unipool_serve.model_executor.steering.family_hooks import GateHook, RouterTap

    def layer(hooked: bool, plain: bool):
        table, capture = SteeringTable(16, 2, 8, 2, top_k=2), RoutingCapture(16, 1, 8, 2, layers=(1,))
        gate, router = _Gate(), _Router()
        if grouped:
            router.num_expert_group, router.topk_group, router.scoring_func = 2, 1, "sigmoid"
            router.routed_scaling_factor, router.e_score_correction_bias = 1.0, None
        if hooked:
            gate.register_forward_hook(GateHook(table, layer=1, capture=capture, row=0))
            RouterTap(router, table, RoutingCounts(2, 8), layer=1, grouped=grouped, capture=capture, row=0)

        def step(x):
            with plain_step(table, capture) if plain else contextlib.nullcontext():
                logits = gate(x)
                return router.select_experts(x, logits)
        return step

    plain_vllm, counts = layer(hooked=False, plain=False), RoutingCounts(2, 8)

    def counts_only(x):  # plain vLLM's layer, then the router tap's one addition: the routing counts
        weights, ids = plain_vllm(x)
        counts.record(1, ids)
        return weights, ids

    x = torch.randn(T, 4)
    idle = _ops(layer(hooked=True, plain=True), x)
    assert idle == _ops(counts_only, x)
    assert len(_ops(layer(hooked=True, plain=False), x)) > len(idle)


def test_each_variant_and_each_graph_setting_gets_its_own_saved_graphs(monkeypatch):
    """vLLM keys the compiled graphs it saves by its config and the compiled forward's name and line: two
    variants of one class, or an engine started with other UNIPOOL_ settings, would load each other's."""
    from vllm.compilation.decorators import _model_hash_key
    from vllm.config import VllmConfig

    from unipool_serve.model_executor.steering.idle_steps import VARIANTS, key_saved_graphs

    assert len({_model_hash_key(cls.forward) for cls, _ in VARIANTS.values()}) == len(VARIANTS)
    hashes = []
    for steering in ("1", "0"):
        monkeypatch.setenv("UNIPOOL_STEERING", steering)
        config = VllmConfig()
        key_saved_graphs(config)
        hashes.append(config.compute_hash())
    assert hashes[0] != hashes[1]
