"""Routing probes without an engine: the file, the fit, the engine-side scoring and gate, the signed
fields, the request fields, the key bindings, and what the enforcement point makes of them."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch
from test_enforcement import SECRET, FakeClient, _request, _submit
from vllm.exceptions import GracefulHTTPError, VLLMValidationError

from unipool_serve.demo.tiny_model import tiny_config
from unipool_serve.model_executor.routing_capture import RoutingCapture
from unipool_serve.model_executor.steering import contract
from unipool_serve.model_executor.steering.probe import ProbeError, RoutingProbe, routing_distribution
from unipool_serve.model_executor.steering.probing import ProbedRequests, ProbeRows
from unipool_serve.model_executor.steering.profile import SteeringProfile
from unipool_serve.model_executor.steering.request_rows import RequestRows
from unipool_serve.model_executor.steering.table import SteeringTable
from unipool_serve.server.enforcement import RequestContext, SteeringEnforcer
from unipool_serve.server.errors import APIError
from unipool_serve.server.policy import AccessPolicy, Binding
from unipool_serve.server.profile_store import ProbeStore, ProfileStore
from unipool_serve.server.request_fields import take_fields
from unipool_serve.tools.fit.data import Example
from unipool_serve.tools.fit.probe import auroc, fit_probe, threshold_for

CFG = tiny_config()  # 4 layers, 8 experts, top-1
L, E = CFG.num_hidden_layers, CFG.num_experts


def _probe(name="code", threshold=0.5, weight=None, bias=0.0):
    weight = torch.zeros(L, E) if weight is None else weight
    return RoutingProbe.for_model(CFG, name=name, weight=weight, bias=bias, threshold=threshold,
                                  labels={"1": "code", "0": "prose"})


# ---- the file ---------------------------------------------------------------------------------------------

def test_a_probe_file_round_trips_and_is_refused_for_another_model_or_when_malformed():
    probe = _probe(weight=torch.randn(L, E), bias=0.3)
    loaded = RoutingProbe.from_bytes(probe.to_bytes(), CFG)
    assert torch.equal(loaded.weight, probe.weight) and loaded.content_hash() == probe.content_hash()
    assert loaded.labels == {"1": "code", "0": "prose"} and loaded.layers == tuple(range(L))
    with pytest.raises(ProbeError, match="fitted on another model"):
        RoutingProbe.from_bytes(probe.to_bytes(), tiny_config(num_experts=16))
    with pytest.raises(ProbeError, match="not a valid safetensors"):
        RoutingProbe.from_bytes(b"junk", CFG)
    with pytest.raises(ProbeError, match="threshold"):
        _probe(threshold=1.5)
    with pytest.raises(ProbeError, match="weight has shape"):
        RoutingProbe.for_model(CFG, name="x", weight=torch.zeros(L, E + 1), bias=0.0, threshold=0.5)
    profile_bytes = SteeringProfile.for_config(CFG, name="p").to_bytes()
    with pytest.raises(ProbeError, match="format"):
        RoutingProbe.from_bytes(profile_bytes, CFG)


# ---- the fit ----------------------------------------------------------------------------------------------

class SyntheticSource:
    """Router logits whose expert 3 leans up for label-1 examples: a behaviour the routing shows."""

    description = "synthetic"

    def capture(self, examples, progress=True, whole_prompt=False):
        assert whole_prompt  # a probe scores every prompt token
        traces = []
        for e in examples:
            gen = torch.Generator().manual_seed(e.line)
            logits = torch.randn(6, L, E, generator=gen)
            logits[:, :, 3] += 1.5 * e.label
            traces.append(logits)
        return traces


def test_fit_separates_a_behaviour_the_routing_shows_and_holds_its_false_positive_rate():
    examples = [Example(label=i % 2, prompt=f"p{i}", line=i) for i in range(200)]
    fitted = fit_probe(SyntheticSource(), CFG, examples, "sha", name="code", fpr=0.1, progress=False)
    assert fitted.metrics["test"]["auroc"] > 0.95
    assert fitted.metrics["val"]["fpr"] <= 0.1 and fitted.metrics["test"]["tpr"] > 0.8
    assert fitted.probe.provenance["target_fpr"] == 0.1 and fitted.probe.weight[:, 3].mean() > 0


def test_auroc_and_threshold_rules():
    assert auroc(np.array([0.9, 0.8, 0.1]), np.array([1, 1, 0])) == 1.0
    assert auroc(np.array([0.5, 0.5]), np.array([1, 0])) == 0.5
    negatives = np.array([0.1, 0.2, 0.3, 0.9])
    t = threshold_for(negatives, 0.25)  # one of four may fire
    assert (negatives >= t).sum() == 1 and t > 0.3
    assert (negatives >= threshold_for(negatives, 0.0)).sum() == 0


# ---- in the engine ----------------------------------------------------------------------------------------

def _probed(threshold=0.5, bias=0.0):
    rows = ProbeRows(L, E, max_probes=4)
    weight = np.zeros((L, E))
    weight[:, 3] = 10.0
    rows.set_row(2, {"weight": weight.tolist(), "bias": bias, "threshold": threshold}, "dg")
    return rows, ProbedRequests(rows, RoutingCapture(8, L, E, 1))


def test_the_engine_scores_the_whole_prompt_once_and_opens_a_gate_from_the_prompts_end():
    rows, probed = _probed(bias=-8.0)
    steering = contract.Steering(1, "p", None, probes=((2, "dg"),), gate=2, probe_output=True)
    probed.admit("r", steering, prompt_len=4)
    leaning = np.zeros((L, E))
    leaning[:, 3] = 1.0  # all the routing on expert 3
    probed.collect("r", np.array([0, 1]), np.stack([leaning] * 2))  # a first prefill chunk
    assert probed.gate_from("r") is None
    probed.collect("r", np.array([0, 1]), np.stack([leaning] * 2))  # recomputed: not counted twice
    probed.collect("r", np.array([2, 3]), np.stack([leaning] * 2))  # the prompt's end
    assert probed.gate_from("r") == 4
    probed.collect("r", np.array([4]), np.full((1, L, E), 1.0 / E))  # a generated token, even routing
    taken = probed.take("r")[2]
    assert taken["fired"] and taken["score"] > 0.99 and not taken["output_fired"]
    assert probed.take("r") is None  # forgotten once taken
    rows.clear_row(2)
    probed.admit("s", steering, prompt_len=1)
    probed.collect("s", np.array([0]), leaning[None])
    assert np.isnan(probed.take("s")[2]["score"])  # its row changed since admission: no score


def test_a_gated_request_runs_unsteered_until_its_probe_fires_then_only_from_the_prompts_end():
    table = SteeringTable(16, L, E, 4, top_k=1)
    table.set_row(1, {"bias": torch.zeros(L, E), "mask": torch.zeros(L, E)}, "p")
    _, probed = _probed(threshold=0.99, bias=-1e3)  # this probe never fires
    rows = RequestRows(table, probed=probed)
    rows.secret = SECRET
    gated = contract.steering_args(SECRET, "p", 1, "p", probes=((2, "dg"),), gate=2)
    plain = contract.steering_args(SECRET, "p", 1, "p")
    rows.admit("g", type("P", (), {"extra_args": gated})(), prompt_len=3)
    rows.admit("u", type("P", (), {"extra_args": plain})(), prompt_len=3)
    starts = np.array([0, 3, 6])
    token_rows, _ = rows.per_token(["g", "u"], starts, np.array([0, 1, 2, 0, 1, 2]))
    assert token_rows.tolist() == [0, 0, 0, 1, 1, 1]  # gate closed: unsteered; the ungated one steered
    probed._requests["g"].gate_from = 3  # as if its probe had fired on a 3-token prompt
    token_rows, _ = rows.per_token(["g"], np.array([0, 5]), np.array([1, 2, 3, 4, 5]))  # a recomputation
    assert token_rows.tolist() == [0, 0, 1, 1, 1]  # its prompt stays unsteered


def test_routing_distribution_sums_softmax_over_tokens():
    logits = torch.zeros(3, 2, 4)
    assert np.allclose(routing_distribution(logits), np.full((2, 4), 0.75))


# ---- the signed fields, the request fields, the bindings ----------------------------------------------------

def test_probes_and_the_gate_are_signed():
    args = contract.steering_args(SECRET, "p", 1, "d", probes=((2, "dg"), (3, "dh")), gate=2, probe_output=True)
    verified = contract.verified_row(args, SECRET)
    assert verified.probes == ((2, "dg"), (3, "dh")) and verified.gate == 2 and verified.probe_output
    for key, forged in ((contract.ARG_GATE, None), (contract.ARG_PROBES, [[2, "dg"]]),
                        (contract.ARG_PROBE_OUTPUT, False)):
        with pytest.raises(ValueError, match="not signed"):
            contract.verified_row({**args, key: forged}, SECRET)


def test_request_fields_for_probes_and_gates():
    body = {"prompt": "x", "steering": {"profile": "safe", "when": "risky"}, "probes": ["a", "b", "a"],
            "probe_output": True, "vllm_xargs": {"probes": "c", "n": 1}}
    fields = take_fields(body, "/v1/completions")
    assert (fields.profile, fields.gate, fields.probes, fields.probe_output) == ("safe", "risky", ("a", "b", "c"), True)
    assert body == {"prompt": "x", "vllm_xargs": {"n": 1}}
    assert take_fields({"vllm_xargs": {"steering": "s", "steering_when": "r"}}, "/v1/responses").gate == "r"
    for bad, param in (({"probes": "a"}, "probes"), ({"probes": ["bad name"]}, "probes"),
                       ({"probe_output": 1}, "probe_output"), ({"steering": {"when": "r"}}, "steering"),
                       ({"steering": {"profile": "s", "when": "r", "x": 1}}, "steering"),
                       ({"vllm_xargs": {"probes": ["a"]}}, "vllm_xargs.probes")):
        with pytest.raises(APIError) as err:
            take_fields(bad, "/v1/completions")
        assert err.value.status == 400 and err.value.param == param


def test_key_bindings():
    policy = AccessPolicy.parse(["k=safe@risky+audit", "p=+audit", "plain=safe", "open"], "root")
    assert policy.keys["k"] == Binding("safe", "risky", ("audit",)) and policy.keys["plain"] == Binding("safe")
    assert policy.bound_profiles() == {"safe"} and policy.bound_probes() == {"risky", "audit"}
    for bad in ("k=@risky", "k=safe@", "k=safe+"):
        with pytest.raises(ValueError, match="--api-key k"):
            AccessPolicy.parse([bad], None)


# ---- the enforcement point --------------------------------------------------------------------------------

def _setup_with_probes():
    store, probes = ProfileStore(CFG, max_profiles=4), ProbeStore(CFG, max_profiles=4)
    asyncio.run(store.add(SteeringProfile.for_config(CFG, name="safe", exclude={0: [1]}), persist=False))
    for name in ("risky", "audit"):
        asyncio.run(probes.add(_probe(name), persist=False))
    client = FakeClient()
    SteeringEnforcer(store, SECRET, probes=probes).install(client)
    client.engine_core.outputs = client.output_processor
    return store, probes, client.engine_core


def test_the_enforcement_point_signs_probes_and_gates_and_keeps_kv_blocks_apart():
    store, probes, core = _setup_with_probes()
    ctx = RequestContext(bound="safe", bound_gate="risky", bound_probes=("audit",))
    sent = _submit(core, _request("g1", cache_salt="mine"), ctx)
    verified = contract.verified_row(sent.sampling_params.extra_args, SECRET)
    risky, audit = probes.by_name["risky"], probes.by_name["audit"]
    assert verified.row == store.by_name["safe"].slot and verified.gate == risky.slot
    assert {slot for slot, _ in verified.probes} == {risky.slot, audit.slot}
    assert "gated-" in sent.cache_salt  # its own: shares no KV block either way
    assert sent.sampling_params.skip_reading_prefix_cache  # every prompt token is scored
    assert ctx.probe_names == {risky.slot: "risky", audit.slot: "audit"} and "g1" in risky.pinned_by
    probed = _submit(core, _request("p1", cache_salt="mine"), RequestContext(asked_probes=("audit",)))
    assert probed.cache_salt == "mine" and probed.sampling_params.skip_reading_prefix_cache  # its blocks: shareable
    with pytest.raises(VLLMValidationError, match="unknown probe 'nope'"):
        _submit(core, _request("x1"), RequestContext(asked_probes=("nope",)))
    with pytest.raises(VLLMValidationError, match="no profile to apply"):
        _submit(core, _request("x2"), RequestContext(asked_gate="risky"))
    with pytest.raises(VLLMValidationError, match="cannot be combined"):
        _submit(core, _request("x3"), RequestContext(asked="safe", asked_gate="risky", budget=1))
    with pytest.raises(GracefulHTTPError) as refused:
        _submit(core, _request("x4"), RequestContext(bound="safe", asked_gate="audit"))
    assert refused.value.http_status == 403


def test_probes_are_refused_where_routing_cannot_be_read():
    store, probes = ProfileStore(CFG, max_profiles=4), ProbeStore(CFG, max_profiles=4)
    client = FakeClient()
    SteeringEnforcer(store, SECRET, probes=probes, capture_refused="capture is off").install(client)
    client.engine_core.outputs = client.output_processor
    with pytest.raises(VLLMValidationError, match="capture is off"):
        _submit(client.engine_core, _request(), RequestContext(asked_probes=("audit",)))


def test_results_name_probes_by_their_rows():
    from unipool_serve.server.capture import _fields

    fields = _fields({"experts": None, "logits": None, "probes": {3: {"score": 0.9, "fired": True}}}, [], {3: "risky"})
    assert fields == {"probe_scores": {"risky": {"score": 0.9, "fired": True}}}
    assert json.dumps(fields)
