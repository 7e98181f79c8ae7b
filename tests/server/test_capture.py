"""Per-request routing capture over the API: shapes, encoding, the routing actually used,
batch invariance, streaming, prefix caching, the byte limit.

A top-2 softmax model (so the k axis and expert budgets are real) in float32, with prefix caching on.
"""

from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
import pytest

from server_process import API_KEY, BOUND_KEY, PROMPT, start

pytestmark = pytest.mark.server
LAYERS, EXPERTS, TOP_K = 4, 8, 2


@pytest.fixture(scope="module")
def server(tiny_model_factory, tmp_path_factory):
    model = tiny_model_factory("capture-model", seed=7, num_experts_per_tok=TOP_K, router_type="softmax",
                               norm_topk_prob=True)
    # float32, so a batch's different GEMM shapes change router logits only in the last bits
    with start(tmp_path_factory, model, ["--enable-prefix-caching", "--max-capture-bytes", "10000",
                                         "--dtype", "float32"]) as s:
        yield s


def _array(field: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(field)), allow_pickle=False)


def _complete(server, key=API_KEY, **fields):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "ignore_eos": True, **fields}
    resp = server.http(key).post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_routed_experts_and_logits_shapes_and_encoding(server):
    out = _complete(server, return_routed_experts=True, return_router_logits=True)
    computed = out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"] - 1
    experts, logits = _array(out["choices"][0]["routed_experts"]), _array(out["choices"][0]["router_logits"])
    assert experts.shape == (computed, LAYERS, TOP_K) and experts.dtype == np.uint8
    assert logits.shape == (computed, LAYERS, EXPERTS) and logits.dtype == np.float16
    # softmax top-2, renormalised: the captured experts are the two largest captured logits
    top2 = np.sort(np.argsort(-logits.astype(np.float32), axis=-1, kind="stable")[..., :2], axis=-1)
    assert (np.sort(experts, axis=-1) == top2).mean() > 0.99  # fp16 rounding may swap near-ties
    plain = _complete(server)
    assert plain["choices"][0].get("routed_experts") is None and plain["choices"][0]["text"] == out["choices"][0]["text"]


def test_the_routing_reported_is_the_routing_used(server):
    steered = _array(_complete(server, steering="only-e5", return_routed_experts=True)["choices"][0]["routed_experts"])
    assert (steered == 5).any(axis=-1).all()  # an include: expert 5 in every token's choice, every layer
    excluded = _array(_complete(server, steering="no-e0", return_routed_experts=True)["choices"][0]["routed_experts"])
    assert not (excluded == 0).any()
    bound = _array(_complete(server, key=BOUND_KEY, return_routed_experts=True)["choices"][0]["routed_experts"])
    assert np.array_equal(bound, steered)
    budget = _array(_complete(server, return_routed_experts=True, expert_budget={"top_k": 1})["choices"][0]["routed_experts"])
    assert (budget[..., 1] == EXPERTS).all() and (budget[..., 0] < EXPERTS).all()  # the dropped slot holds E


def test_prompt_start_skips_prompt_tokens(server):
    full = _array(_complete(server, return_routed_experts=True)["choices"][0]["routed_experts"])
    part = _array(_complete(server, return_routed_experts=True, routed_experts_prompt_start=3)["choices"][0]["routed_experts"])
    assert np.array_equal(part, full[3:])


def _first_difference_is_a_near_tie(batched: dict, solo: dict) -> None:
    """Routing in a batch equals the solo run's, up to the first near-tie the batch's arithmetic flipped.

    A CPU GEMM's reduction order depends on the batch's shape, so router logits in a batch can
    differ from a solo run's in the last bits: where two experts' logits tie that closely the
    choice may flip, and everything after it is a different (equally valid) computation. A row
    taken from another request would differ at a clear margin, which this rejects."""
    got, want = _array(batched["routed_experts"]), _array(solo["routed_experts"])
    assert got.shape == want.shape
    differs = np.sort(got, axis=-1) != np.sort(want, axis=-1)
    if not differs.any():
        return
    token, layer = np.argwhere(differs.any(axis=-1))[0]
    logits = _array(solo["router_logits"])[token, layer].astype(np.float32)
    swapped_in = set(got[token, layer].tolist()) - set(want[token, layer].tolist())
    swapped_out = set(want[token, layer].tolist()) - set(got[token, layer].tolist())
    tolerance = 2 * float(np.spacing(np.float16(np.abs(logits).max())))  # the captured logits are fp16
    gaps = [abs(logits[a] - logits[b]) for a in swapped_in for b in swapped_out]
    assert max(gaps) <= tolerance, (f"token {token} layer {layer}: batch chose {sorted(swapped_in)} over "
                                    f"{sorted(swapped_out)} at logit gaps {gaps} > {tolerance}")


def test_capture_never_changes_tokens_and_mixed_batches_equal_solo_runs(server):
    capture = {"return_routed_experts": True, "return_router_logits": True}
    jobs = [{"prompt": f"{PROMPT} # {i}", **fields} for i, fields in enumerate(
        [capture, {}, {**capture, "steering": "only-e5"}, {"steering": "no-e0"}, {**capture, "steering": "no-e0"},
         {"steering": "only-e5"}])]
    solo = [_complete(server, **job)["choices"][0] for job in jobs]
    together, threads = {}, []
    for i, job in enumerate(jobs):
        threads.append(threading.Thread(target=lambda i=i, job=job: together.__setitem__(
            i, _complete(server, **job)["choices"][0])))
        threads[-1].start()
    for t in threads:
        t.join()
    for i, job in enumerate(jobs):
        assert together[i]["text"] == solo[i]["text"]
        if job.get("return_routed_experts"):
            _first_difference_is_a_near_tie(together[i], solo[i])
        else:
            assert together[i].get("routed_experts") is None
    # each capturing request's rows obey its own profile, whatever else shared the batch
    assert (_array(together[2]["routed_experts"]) == 5).any(axis=-1).all()
    assert not (_array(together[4]["routed_experts"]) == 0).any()
    assert not (_array(together[0]["routed_experts"]) == 5).any(axis=-1).all()


def test_prefix_cached_prompts_still_report_every_position(server):
    long_prompt = " ".join(f"w{i}" for i in range(80))
    _complete(server, prompt=long_prompt)  # fills the prefix cache
    out = _complete(server, prompt=long_prompt, return_routed_experts=True)
    computed = out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"] - 1
    assert _array(out["choices"][0]["routed_experts"]).shape[0] == computed


def test_streaming_carries_it_in_each_choices_last_chunk(server):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 5, "temperature": 1.0, "seed": 3, "n": 2,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            "return_routed_experts": True}
    with server.http().stream("POST", "/v1/completions", json=body) as resp:
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    finals = [c for chunk in chunks for c in chunk["choices"] if c.get("finish_reason")]
    assert sorted(c["index"] for c in finals) == [0, 1]
    usage = next(chunk["usage"] for chunk in chunks if chunk.get("usage"))
    for choice in finals:
        computed = usage["prompt_tokens"] + 5 - 1
        assert _array(choice["routed_experts"]).shape == (computed, LAYERS, TOP_K)
    assert not any(c.get("routed_experts") for chunk in chunks for c in chunk["choices"] if not c.get("finish_reason"))


def test_limits_and_routes(server):
    http = server.http()
    # logits are 4 layers x 8 experts x 2 bytes = 64 bytes per token; the limit here is 10000 bytes
    assert http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 100,
                                              "return_router_logits": True}).status_code == 200
    resp = http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 200,
                                              "return_router_logits": True})
    assert resp.status_code == 400 and "limit is 10000 bytes" in resp.json()["error"]["message"]
    for body, message in (({"model": "tiny", "prompt": "x", "return_routed_experts": "yes"}, "true or false"),
                          ({"model": "tiny", "prompt": ["a", "b"], "return_routed_experts": True}, "one prompt")):
        resp = http.post("/v1/completions", json=body)
        assert resp.status_code == 400 and message in resp.json()["error"]["message"]
    resp = http.post("/v1/responses", json={"model": "tiny", "input": "x", "return_routed_experts": True})
    assert resp.status_code == 400 and "served on" in resp.json()["error"]["message"]


def test_fit_captures_what_the_reference_model_computes(server, tiny_model_factory):
    """`unipool-steering fit --server`'s source: the captured tokens (every prompt token; a chat's
    final user message) and their raw logits are the reference model's, to float16."""
    import torch

    from unipool_serve.tools.fit.data import Example
    from unipool_serve.tools.fit.server import ServerSource
    from unipool_serve.tools.fit.sources import ReferenceSource

    model = tiny_model_factory("capture-model", seed=7, num_experts_per_tok=TOP_K, router_type="softmax",
                               norm_topk_prob=True)  # the server fixture's folder (the factory caches it)
    examples = [Example(label=1, prompt=PROMPT),
                Example(label=0, messages=(("system", "be brief"), ("user", "first"), ("assistant", "ok"),
                                           ("user", "and the last one")))]
    source = ServerSource(server.url, api_key=API_KEY)
    try:
        captured = source.capture(examples, progress=False)
    finally:
        source.close()
    for got, want in zip(captured, ReferenceSource(model).capture(examples, progress=False)):
        assert got.dtype == torch.float16 and got.shape == want.shape
        torch.testing.assert_close(got.float(), want, atol=2e-3 * max(1.0, float(want.abs().max())), rtol=0)
