"""Routing probes through a real server: listed, uploaded and deleted like profiles, scores in responses
(streamed too) and in /metrics, a profile gated by a probe (from the prompt's end on, never before; a probe
that does not fire leaves the request exactly as unsteered; a key's gate cannot be escaped), and the KV
cache (a continuation of a gated request's steered output never reads its blocks).

The probes of server_process.py decide without looking at the model: `always` fires on every prompt,
`never` on none. Routing is read from the requests' own capture (`return_routed_experts`), so every
check holds whatever the tiny model's weights are.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

from server_process import ADMIN_KEY, API_KEY, BOUND_KEY, GATED_KEY, MAIN_SERVER, PROMPT, server  # noqa: F401

pytestmark = pytest.mark.server
SHARED_SERVERS = (MAIN_SERVER,)
TOKENS = 8


def _complete(server, key=API_KEY, **body):
    answer = server.http(key).post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": TOKENS,
                                                           "min_tokens": TOKENS, "temperature": 0, **body})
    return answer.status_code, answer.json()


def _experts(choice) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(choice["routed_experts"])))  # [tokens, layers, k]


def test_probes_are_listed_and_managed_like_profiles(server):
    names = [p["id"] for p in server.http().get("/v1/steering/probes").json()["data"]]
    assert names == ["always", "never"]
    assert "threshold" not in server.http().get("/v1/steering/probes/always").json()  # details: admin only
    detail = server.http(ADMIN_KEY).get("/v1/steering/probes/always").json()
    assert detail["threshold"] == 0.5 and detail["layers"] == [0, 1, 2, 3]
    from unipool_serve.model_executor.steering.probe import RoutingProbe

    probe_file = RoutingProbe.load(server.steering_dir.parent / "probes" / "never.safetensors")
    probe_file.name = "uploaded-probe"
    assert server.http().post("/v1/steering/probes", content=probe_file.to_bytes()).status_code == 403  # admin only
    assert server.http(ADMIN_KEY).post("/v1/steering/probes", content=b"junk").json()["error"]["code"] == "invalid_probe"
    assert server.http(ADMIN_KEY).post("/v1/steering/probes", content=probe_file.to_bytes()).status_code == 201
    assert _complete(server, probes=["uploaded-probe"])[1]["choices"][0]["probe_scores"]["uploaded-probe"]["fired"] is False
    assert server.http(ADMIN_KEY).delete("/v1/steering/probes/uploaded-probe").json()["deleted"]
    status, answer = _complete(server, probes=["uploaded-probe"])
    assert status == 400 and answer["error"]["param"] == "probes" and "unknown probe" in answer["error"]["message"]


def test_scores_in_responses_streams_and_metrics(server):
    status, answer = _complete(server, probes=["always", "never"], probe_output=True)
    scores = answer["choices"][0]["probe_scores"]
    assert status == 200 and scores["always"]["fired"] and not scores["never"]["fired"]
    assert scores["always"]["score"] > 0.99 and "output_score" in scores["always"]
    chunks = []
    with server.http().stream("POST", "/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": TOKENS,
                                                               "stream": True, "probes": ["always"]}) as stream:
        chunks = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
    final = [c for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
    assert final and final[-1]["choices"][0]["probe_scores"]["always"]["fired"]
    chat = server.http().post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2, "vllm_xargs":
                              {"probes": "never"}, "messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["choices"][0]["probe_scores"]["never"]["fired"] is False
    metrics = server.http().get("/metrics").text
    assert 'unipool_probe_fired_total{probe="always"}' in metrics and 'unipool_probe_score_count{probe="never"}' in metrics


def test_a_gated_profile_applies_from_the_prompts_end_and_a_probe_that_does_not_fire_changes_nothing(server):
    _, plain = _complete(server, return_routed_experts=True)
    _, held = _complete(server, return_routed_experts=True, steering={"profile": "only-e5", "when": "never"})
    assert held["choices"][0]["text"] == plain["choices"][0]["text"]  # not fired: exactly as unsteered
    assert np.array_equal(_experts(held["choices"][0]), _experts(plain["choices"][0]))
    _, fired = _complete(server, return_routed_experts=True, steering={"profile": "only-e5", "when": "always"})
    routed, prompt_len = _experts(fired["choices"][0]), fired["usage"]["prompt_tokens"]
    assert (routed[prompt_len:] == 5).all()  # every generated token's routing: the profile's (all to expert 5)
    assert np.array_equal(routed[:prompt_len], _experts(plain["choices"][0])[:prompt_len])  # the prompt: unsteered
    assert fired["choices"][0]["probe_scores"]["always"]["fired"]


def test_a_keys_gate_and_probes_cannot_be_escaped(server):
    status, answer = _complete(server, key=GATED_KEY, return_routed_experts=True)
    routed, prompt_len = _experts(answer["choices"][0]), answer["usage"]["prompt_tokens"]
    assert status == 200 and (routed[prompt_len:] == 5).all()  # bound: only-e5 once `always` fires
    assert set(answer["choices"][0]["probe_scores"]) == {"always", "never"}  # its mandatory probes
    for escape in ({"steering": {"profile": "only-e5", "when": "never"}}, {"steering": "no-e0"},
                   {"vllm_xargs": {"steering": "only-e5", "steering_when": "never"}}):
        status, answer = _complete(server, key=GATED_KEY, **escape)
        assert status == 403, (escape, answer)
    status, answer = _complete(server, key=BOUND_KEY, steering={"profile": "only-e5", "when": "always"})
    assert status == 403  # a key bound without a gate cannot add one
    for bad, param in (({"steering": {"profile": "only-e5", "when": "nope"}}, "probes"),
                       ({"steering": {"when": "always"}}, "steering"),
                       ({"steering": {"profile": "only-e5", "when": "always"}, "expert_budget": {"top_k": 1}},
                        "steering")):
        status, answer = _complete(server, **bad)
        assert status == 400 and answer["error"]["param"] == param, (bad, answer)


def test_a_continuation_of_a_gated_requests_output_never_reads_its_steered_blocks(server):
    prompt = " ".join(["the river runs to the sea and the rain"] * 6)  # two 32-token blocks and more
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 40, "min_tokens": 40, "temperature": 0}
    gated = server.http().post("/v1/completions", json={**body, "steering": {"profile": "only-e5", "when": "always"}})
    continuation = {**body, "prompt": prompt + gated.json()["choices"][0]["text"], "max_tokens": 1, "min_tokens": 1}
    first = server.http().post("/v1/completions", json=continuation).json()
    again = server.http().post("/v1/completions", json=continuation).json()
    cached = [(a["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0 for a in (first, again)]
    assert cached[0] == 0  # none of the gated request's blocks, steered or not
    assert cached[1] > 0  # the cache works: the second run reads the first run's own blocks
    steered = server.http().post("/v1/completions", json={**continuation, "steering": "only-e5"}).json()
    assert ((steered["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0) == 0
