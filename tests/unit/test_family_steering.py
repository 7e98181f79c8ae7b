"""Steering of vLLM's own MoE families without an engine: the routing rules, the model
description, the hooks on stand-in modules, vLLM's own routing functions on steered logits,
profiles for these models, and the metrics' cardinality cap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from unipool_serve.kernels import routing_reference as ref
from unipool_serve.kernels.routing_spec import RoutingSpec
from unipool_serve.model_executor.routing_counts import RoutingCounts
from unipool_serve.model_executor.steering.family_hooks import GateHook, RouterTap, weight_rank
from unipool_serve.model_executor.steering.profile import SteeringProfile, SteeringProfileError
from unipool_serve.model_executor.steering.shape import SteerableModel
from unipool_serve.model_executor.steering.table import SteeringTable

T, E, K = 64, 16, 2


def _rows(seed=0, include=(3,), exclude=(5, 9)):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=gen) * 2
    bias = torch.randn(T, E, generator=gen)
    mask = torch.zeros(T, E, dtype=torch.int8)
    mask[:, list(include)], mask[:, list(exclude)] = 1, -1
    return logits, bias, mask


def test_zero_rows_leave_logits_bit_for_bit():
    logits, _, _ = _rows()
    for dtype in (torch.float32, torch.bfloat16):
        z = logits.to(dtype)
        out = ref.steer_router_logits(z, torch.zeros(T, E), torch.zeros(T, E, dtype=torch.int8))
        assert out.dtype == dtype and torch.equal(out, z)


def test_logit_transform_routes_like_the_reference_for_softmax():
    logits, bias, mask = _rows()
    for renormalize in (False, True):
        spec = RoutingSpec.of("softmax", K, renormalize=renormalize)
        ids, weights = ref.route(logits, spec, bias=bias, mask=mask)
        z = ref.steer_router_logits(logits, bias, mask)
        probs = torch.softmax(z, -1)
        top_w, top_i = probs.topk(K, dim=-1)  # what vLLM's softmax top-k does with them
        if renormalize:
            top_w = top_w / top_w.sum(-1, keepdim=True)
        assert torch.equal(top_i.sort(-1).values, ids.long().sort(-1).values)
        torch.testing.assert_close(top_w.sort(-1).values, weights.sort(-1).values, atol=1e-6, rtol=1e-5)


def test_includes_beat_ties_and_excludes_never_win_in_bf16():
    z = torch.zeros(4, E, dtype=torch.bfloat16)  # every logit tied: an include must still rank first
    mask = torch.zeros(4, E, dtype=torch.int8)
    mask[:, 7], mask[:, 0] = 1, -1
    out = ref.steer_router_logits(z, None, mask)
    assert (out.topk(1, dim=-1).indices[:, 0] == 7).all() and torch.isinf(out[:, 0]).all()


def test_vllm_sparsemixer_and_topk_softmax_on_steered_logits():
    from vllm.model_executor.layers.fused_moe.router.cpu_router import _softmax_topk
    from vllm.model_executor.models.phimoe import sparsemixer

    logits, bias, mask = _rows(include=(3,), exclude=(5, 9))
    z = ref.steer_router_logits(logits, bias, mask)
    for weights, ids in (sparsemixer(z), _softmax_topk(z, K, True)):
        assert (ids == 3).any(-1).all() and not ((ids == 5) | (ids == 9)).any()
        assert torch.isfinite(weights).all()


def _vllm_grouped(logits, bias_e, groups, chosen, scoring):
    from vllm.model_executor.layers.fused_moe.router.cpu_router import _grouped_topk

    return _grouped_topk(logits, K, True, groups, chosen, scoring, 1.0, bias_e)


@pytest.mark.parametrize("scoring,with_bias", [("sigmoid", True), ("softmax", False)])
def test_grouped_select_without_mask_equals_vllm(scoring, with_bias):
    logits, _, _ = _rows(seed=1)
    bias_e = torch.randn(E) * 0.3 if with_bias else None
    w, i = ref.grouped_select(logits, torch.zeros(T, E, dtype=torch.int8), top_k=K, num_groups=4, topk_groups=2,
                              scoring=scoring, correction_bias=bias_e, renormalize=True)
    vw, vi = _vllm_grouped(logits, bias_e, 4, 2, scoring)
    order, vorder = i.sort(-1), vi.long().sort(-1)
    assert torch.equal(order.values, vorder.values)
    torch.testing.assert_close(w.gather(1, order.indices), vw.gather(1, vorder.indices))


def test_grouped_select_honours_masks_where_a_logit_cannot():
    logits, _, _ = _rows(seed=2)
    bias_e = torch.zeros(E)
    bias_e[5] = 10.0  # the correction bias alone would always pick expert 5
    mask = torch.zeros(T, E, dtype=torch.int8)
    mask[:, 5], mask[:, 14] = -1, 1  # exclude the favourite; include one in another group
    mask[:, 0:3] = -1  # group 0 (experts 0-3) keeps a single usable expert
    z = ref.steer_router_logits(logits, None, mask)
    w, i = ref.grouped_select(z, mask, top_k=K, num_groups=4, topk_groups=1, scoring="sigmoid",
                              correction_bias=bias_e, renormalize=True)
    assert (i == 14).any(-1).all() and not ((i == 5) | (i < 3)).any()
    assert len(set(i.flatten().tolist())) > 1 and torch.isfinite(w).all()


def _configs():
    from transformers import DeepseekV3Config, MixtralConfig, Qwen2MoeConfig

    mixtral = MixtralConfig(num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=2, hidden_size=64)
    mixtral.architectures = ["MixtralForCausalLM"]
    qwen = Qwen2MoeConfig(num_hidden_layers=4, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1],
                          decoder_sparse_step=1, shared_expert_intermediate_size=32, hidden_size=64)
    qwen.architectures = ["Qwen2MoeForCausalLM"]
    deepseek = DeepseekV3Config(num_hidden_layers=4, n_routed_experts=16, num_experts_per_tok=2, n_group=4,
                                topk_group=2, first_k_dense_replace=1, hidden_size=64, topk_method="noaux_tc",
                                scoring_func="sigmoid")
    deepseek.architectures = ["DeepseekV3ForCausalLM"]
    return mixtral, qwen, deepseek


def test_steerable_model_from_family_configs():
    mixtral, qwen, deepseek = _configs()
    m, q, d = (SteerableModel.of(c) for c in (mixtral, qwen, deepseek))
    assert (m.num_experts, m.top_k, m.router_kind, m.dense_layers, m.shared_experts) == (8, 2, "softmax", (), False)
    assert q.dense_layers == (1,) and q.shared_experts and q.layer_to_pool == (0, None, 2, 3)
    assert (d.router_kind, d.dense_layers, d.shared_experts) == ("grouped-sigmoid-bias", (0,), True)
    assert len({m.fingerprint, q.fingerprint, d.fingerprint}) == 3
    mixtral.architectures = ["PhimoeForCausalLM"]
    with pytest.raises(ValueError, match="PhiMoEForCausalLM"):
        SteerableModel.of(mixtral)


def test_profiles_for_families_are_validated_against_their_model():
    mixtral, qwen, deepseek = _configs()
    d = SteerableModel.of(deepseek)
    with pytest.raises(SteeringProfileError, match="layer 0 has no experts"):
        SteeringProfile.for_config(d, name="x", exclude={0: [1]})
    bias = torch.zeros(4, 16)
    bias[0, 3] = 1.0
    with pytest.raises(SteeringProfileError, match="layer 0 has no experts"):
        SteeringProfile.for_config(d, name="x", bias=bias)
    with pytest.raises(SteeringProfileError, match="fewer than top_k.*expert_budget"):
        SteeringProfile.for_config(d, name="x", exclude={1: list(range(15))})
    shared = SteeringProfile.for_config(d, name="shared", expert_budget={"top_k": 0})
    loaded = SteeringProfile.from_bytes(shared.to_bytes(), d)
    assert (loaded.expert_budget, loaded.router_kind, loaded.dense_layers) == ({"top_k": 0}, "grouped-sigmoid-bias", (0,))
    assert loaded.content_hash() == shared.content_hash() != SteeringProfile.for_config(d, name="s").content_hash()
    with pytest.raises(SteeringProfileError, match="no shared expert"):
        SteeringProfile.for_config(mixtral, name="x", expert_budget={"top_k": 0})
    with pytest.raises(SteeringProfileError, match="exceeds the model's top_k"):
        SteeringProfile.for_config(d, name="x", expert_budget={"top_k": 99})
    with pytest.raises(SteeringProfileError, match="include has no effect"):
        SteeringProfile.for_config(d, name="x", expert_budget={"top_k": 0}, include={1: [2]})
    with pytest.raises(SteeringProfileError, match="made for another model.*unipool-steering create"):
        SteeringProfile.for_config(mixtral, name="m").validate(qwen)


class _Gate(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits, None


class _Router:
    top_k, num_expert_group, topk_group, scoring_func, renormalize, routed_scaling_factor = K, 4, 2, "sigmoid", True, 1.0
    e_score_correction_bias = None

    def select_experts(self, hidden_states, router_logits, topk_indices_dtype=None, **kwargs):
        w, i = torch.softmax(router_logits, -1).topk(K, dim=-1)
        return w, i.to(torch.int32)


def test_gate_hook_and_router_tap_on_stand_ins():
    logits, bias, mask = _rows(seed=3)
    table = SteeringTable(T, 2, E, 2, top_k=K)
    table.set_row(1, {"bias": torch.stack([torch.zeros(E), bias[0]]),
                      "mask": torch.stack([torch.zeros(E), mask[0]]).to(torch.int8)}, "d1")
    rows = np.array([1] * (T // 2) + [0] * (T - T // 2), dtype=np.int32)  # first half steered, second half not
    table.fill_index(T, rows, np.where(rows == 1, 0, K).astype(np.int32))  # ... and with a routed budget of zero
    gate = _Gate(logits)
    gate.register_forward_hook(GateHook(table, layer=1))
    steered, _ = gate(None)
    expected = ref.steer_router_logits(logits[: T // 2], bias[: T // 2] * 0 + bias[0], mask[: T // 2] * 0 + mask[0])
    assert torch.equal(steered[: T // 2], expected) and torch.equal(steered[T // 2:], logits[T // 2:])
    router, counts = _Router(), RoutingCounts(2, E)
    RouterTap(router, table, counts, layer=1, grouped=True)
    weights, ids = router.select_experts(None, steered)
    plain_w, plain_i = _Router.select_experts(router, None, steered)
    assert torch.equal(ids[T // 2:], plain_i[T // 2:]) and torch.equal(weights[T // 2:], plain_w[T // 2:])
    assert (weights[: T // 2] == 0).all()  # routed budget of zero
    assert (ids[: T // 2] == 3).any(-1).all() and not ((ids[: T // 2] == 5) | (ids[: T // 2] == 9)).any()
    assert counts.counts[1].sum() == (T - T // 2) * K and counts.counts[0].sum() == 0  # dropped slots are not counted


class _UnsortedRouter:
    """Like vLLM's CPU router: its top-k comes back in no particular slot order."""

    top_k, renormalize = 4, True

    def select_experts(self, hidden_states, router_logits, topk_indices_dtype=None, **kwargs):
        weights, ids = torch.softmax(router_logits, -1).topk(4, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)  # renormalize = True
        return weights.flip(-1), ids.flip(-1).to(torch.int32)  # the lightest slot first


def test_hooks_capture_raw_logits_and_the_routing_used_and_budgets_keep_the_heaviest_slots():
    from unipool_serve.model_executor.routing_capture import RoutingCapture

    logits, bias, _ = _rows(seed=4)
    table = SteeringTable(T, 2, E, 2, top_k=4)
    table.set_row(1, {"bias": torch.stack([torch.zeros(E), bias[0]]), "mask": torch.zeros(2, E, dtype=torch.int8)},
                  "d1")
    # two steered tokens; every token keeps 2 of its 4 experts
    table.fill_index(T, np.array([1, 1] + [0] * (T - 2), dtype=np.int32), np.full(T, 2, dtype=np.int32))
    capture = RoutingCapture(T, 1, E, 4, layers=(1,))  # layer 1's row is row 0
    gate, router, counts = _Gate(logits), _UnsortedRouter(), RoutingCounts(2, E)
    gate.register_forward_hook(GateHook(table, layer=1, capture=capture, row=0))
    RouterTap(router, table, counts, layer=1, grouped=False, capture=capture, row=0)
    steered, _ = gate(None)
    weights, ids = router.select_experts(None, steered)
    assert torch.equal(capture.step_logits(T)[0], logits.half())  # raw: before steering
    best_two = torch.softmax(steered, -1).topk(2, dim=-1).indices.sort(-1).values
    kept = capture.step_ids(T)[0]
    assert ((kept == E).sum(-1) == 2).all()  # two slots dropped per token, recorded as E
    assert torch.equal(kept[kept != E].view(T, 2).sort(-1).values, best_two.to(torch.int32))  # the heaviest two
    assert ((weights > 0).sum(-1) == 2).all() and torch.allclose(weights.sum(-1), torch.ones(T))
    assert capture.layers == (1,) and counts.counts[1].sum() == T * 2


def test_weight_rank_is_a_stable_descending_sorts_rank():
    gen = torch.Generator().manual_seed(0)
    for k in (1, 2, 4, 8):
        weights = torch.randint(0, 4, (64, k), generator=gen).float() / 4  # many ties
        sort_rank = weights.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        assert torch.equal(weight_rank(weights), sort_rank), k


class _ScaledRouter(_UnsortedRouter):
    """Like vLLM's CPU grouped router for DeepSeek: renormalised weights times routed_scaling_factor."""

    def select_experts(self, hidden_states, router_logits, topk_indices_dtype=None, **kwargs):
        weights, ids = super().select_experts(hidden_states, router_logits)
        return weights * 1.5, ids


def test_a_budget_keeps_the_routed_scaling_factor():
    logits, _, _ = _rows(seed=5)
    table = SteeringTable(T, 2, E, 2, top_k=4)
    table.fill_index(T, None, np.full(T, 1, dtype=np.int32))
    router = _ScaledRouter()
    RouterTap(router, table, RoutingCounts(2, E), layer=0, grouped=False)
    weights, _ = router.select_experts(None, logits)
    assert ((weights > 0).sum(-1) == 1).all()
    assert torch.allclose(weights.sum(-1), torch.full((T,), 1.5))  # the one kept expert carries the whole scale


def test_pool_metrics_skip_dense_layers_and_cap_expert_series():
    from prometheus_client import CollectorRegistry

    from unipool_serve.server.pool_metrics import PoolMetrics

    small = PoolMetrics(CollectorRegistry(), [None, 1, 2], 8, 5.0, max_expert_series=16)
    small.total = torch.tensor([[0] * 8, [1] * 8, [2] * 8])
    small.update_gauges(small.total)
    families = {f.name: f for f in small.collect()}
    assert len(families["unipool_expert_tokens"].samples) == 16
    assert set(small.layer_imbalance) == {1, 2} and set(small.pool_active) == {1, 2}
    big = PoolMetrics(CollectorRegistry(), [None, 1, 2], 8, 5.0, max_expert_series=15)
    assert not [f for f in big.collect() if f.name == "unipool_expert_tokens"][0].samples


def test_cli_reads_shapes_from_a_family_folder(tmp_path, capsys):
    import json

    from unipool_serve.demo.tiny_families import write_family_model
    from unipool_serve.tools.steering_cli import main

    folder = write_family_model(tmp_path / "ds", "DeepseekV3ForCausalLM", seed=1)
    (tmp_path / "p.json").write_text(json.dumps({"name": "alone", "expert_budget": {"top_k": 0},
                                                 "exclude": {"1": [3]}}))
    assert main(["create", "--model", str(folder), "--json", str(tmp_path / "p.json"),
                 "--out", str(tmp_path / "alone.safetensors")]) == 0
    summary = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert (summary["router_kind"], summary["dense_layers"], summary["num_experts"]) == ("grouped-sigmoid-bias", [0], 8)
    (tmp_path / "bad.json").write_text(json.dumps({"name": "bad", "include": {"0": [1]}}))
    assert main(["create", "--model", str(folder), "--json", str(tmp_path / "bad.json"),
                 "--out", str(tmp_path / "bad.safetensors")]) == 2
    assert "layer 0 has no experts" in capsys.readouterr().err
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    assert main(["show", str(tmp_path / "alone.safetensors"), "--model", str(tmp_path / "cfg")]) == 2
    assert "cannot be steered" in capsys.readouterr().err


def test_pool_metrics_read_the_engine_only_when_it_can_have_computed():
    """An idle engine is not read (each read wakes vLLM's worker into a second of busy-polling); after a
    request is admitted, while one runs, and once more after the last one ends, it is."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from unipool_serve.server.pool_metrics import PoolMetrics

    class Engine:  # the two calls PoolMetrics makes on vLLM's engine client
        def __init__(self):
            self.reads, self.running, self.counts = 0, 0, torch.zeros(2, 4, dtype=torch.int64)

        def get_num_unfinished_requests(self):
            return self.running

        async def collective_rpc(self, name):
            self.reads += 1
            return [self.counts.clone()]

    async def scenario():
        engine, metrics = Engine(), PoolMetrics(CollectorRegistry(), [0, 0], 4, 5.0)
        await metrics.refresh(engine)  # the baseline
        await metrics.refresh(engine)
        assert engine.reads == 1  # idle: not read again
        metrics.count_request(None)
        engine.running, engine.counts[0, 1] = 1, 3
        assert (await metrics.refresh(engine))[0, 1] == 3 and engine.reads == 2
        engine.running, engine.counts[0, 2] = 0, 5  # the request ended after the last read
        assert (await metrics.refresh(engine))[0, 2] == 5 and engine.reads == 3
        await metrics.refresh(engine)
        assert engine.reads == 3
        metrics.count_request("prose")  # admitted and finished between two reads
        engine.counts[1, 0] = 7
        assert (await metrics.refresh(engine))[1, 0] == 7 and engine.reads == 4

    asyncio.run(scenario())
