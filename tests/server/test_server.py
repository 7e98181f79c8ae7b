"""`unipool-serve` end to end: a real process, real HTTP, the official `openai` client.

One server for the whole module, and the same one as test_security.py's (server_process.py;
engine starts are expensive here). Steering is checked through the routing it causes (see
server_process.py), never through what the random tiny model happens to write. Load,
disconnects, hostile input and shutdown are in tests/reliability.
"""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from unipool_serve.demo.tiny_model import tiny_config
from unipool_serve.model_executor.steering.profile import SteeringProfile

from server_process import ADMIN_KEY, API_KEY, BOUND_KEY, MAIN_SERVER, PROMPT, expert_bias

pytestmark = pytest.mark.server
SHARED_SERVERS = (MAIN_SERVER,)
CONFIG = tiny_config()
LAYERS, TOP_K = CONFIG.num_hidden_layers, CONFIG.num_experts_per_tok


def _error(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


def _greedy(client, steering=None, xargs=None, prompt=PROMPT, tokens=12):
    extra = {"ignore_eos": True}
    if steering is not None:
        extra["steering"] = steering
    if xargs is not None:
        extra["vllm_xargs"] = xargs
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=tokens, temperature=0, extra_body=extra)
    return out.choices[0].text


def _all_on(routing: dict[int, float], expert: int) -> bool:
    """Every token-slot went to `expert` (and there were some)."""
    return sum(routing.values()) > 0 and routing[expert] == sum(routing.values())


def test_ready_was_503_while_loading_then_200(server):
    assert 503 in server.ready_codes and server.ready_codes[-1] == 200
    body = httpx.get(f"{server.url}/ready").json()
    assert body["steering_profiles"] == ["no-e0", "no-e1", "only-e5", "push-e5"]
    assert "broken.safetensors" in body["profile_load_errors"]  # reported, not fatal
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_completion_chat_and_streaming_with_usage(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    done = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 8
    n2 = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, n=2, temperature=1.0, seed=1, logprobs=2,
                                   extra_body={"ignore_eos": True})
    assert len(n2.choices) == 2 and len(n2.choices[0].logprobs.token_logprobs) == 4  # (top_logprobs is keyed by text)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                          extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 6
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 8
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text


def test_auth(server):
    assert server.http(key=None).post("/v1/completions", json={"model": "tiny", "prompt": "x"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").completions.create(model="tiny", prompt="x", max_tokens=1)
    assert httpx.get(f"{server.url}/metrics").status_code == 200  # scrapes need no key


def test_steering_by_field_and_by_vllm_xargs(server):
    client = server.client()
    by_field, routing = server.routing_of(lambda: _greedy(client, steering="only-e5"))
    assert _all_on(routing, 5)
    by_xargs, routing = server.routing_of(lambda: _greedy(client, xargs={"steering": "only-e5"}))
    assert by_xargs == by_field and _all_on(routing, 5)
    _, routing = server.routing_of(lambda: _greedy(client, steering="no-e0"))
    assert sum(routing.values()) > 0 and routing[0] == 0
    with pytest.raises(openai.BadRequestError) as err:
        _greedy(client, steering="nope")
    assert "available profiles: ['no-e0', 'no-e1', 'only-e5', 'push-e5']" in str(err.value)
    with pytest.raises(openai.BadRequestError):
        _greedy(client, steering="no-e0", xargs={"steering": "no-e1"})
    with pytest.raises(openai.BadRequestError):
        _greedy(client, xargs={"unipool_steering_slot": 1})


def test_key_bound_profile(server):
    bound = server.client(key=BOUND_KEY)
    text, routing = server.routing_of(lambda: _greedy(bound))
    assert _all_on(routing, 5) and text == _greedy(server.client(), steering="only-e5")
    assert _greedy(bound, steering="only-e5") == text  # naming its own profile is allowed
    with pytest.raises(openai.PermissionDeniedError):
        _greedy(bound, steering="no-e1")


@pytest.mark.parametrize("body", ["{not json", "[]", json.dumps({"model": "tiny", "prompt": "x", "max_tokens": -3}),
                                  json.dumps({"model": "tiny", "prompt": "x", "steering": 7})])
def test_malformed_bodies_get_400_envelopes(server, body):
    resp = server.http().post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 400
    _error(resp)


def test_prompt_longer_than_context_is_400(server):
    resp = server.http().post("/v1/completions", json={"model": "tiny", "prompt": "word " * 600, "max_tokens": 4})
    assert resp.status_code == 400, resp.text
    _error(resp)


def test_profile_admin_api(server):
    http, admin = server.http(), server.http(key=ADMIN_KEY)
    listed = http.get("/v1/steering/profiles").json()["data"]
    assert [p["id"] for p in listed] == ["no-e0", "no-e1", "only-e5", "push-e5"]
    assert all("content_hash" not in p for p in listed)  # content is the admin's to see
    assert set(http.get("/v1/steering/profiles/no-e1").json()) == {"object", "name", "description"}
    assert "content_hash" in admin.get("/v1/steering/profiles").json()["data"][0]
    assert admin.get("/v1/steering/profiles/no-e1").json()["layers"][0]["exclude"] == [1]
    assert _error(http.get("/v1/steering/profiles/missing"))["code"] == "unknown_steering_profile"

    data = SteeringProfile.for_config(CONFIG, name="fresh", exclude={0: [2]}).to_bytes()
    assert http.post("/v1/steering/profiles", content=data).status_code == 403  # not admin
    assert admin.post("/v1/steering/profiles", content=data).status_code == 201
    assert (server.steering_dir / "fresh.safetensors").exists()
    _greedy(server.client(), steering="fresh")  # accepted: an unknown profile would raise BadRequestError
    assert admin.post("/v1/steering/profiles", content=data).status_code == 409
    assert http.delete("/v1/steering/profiles/fresh").status_code == 403
    assert admin.delete("/v1/steering/profiles/fresh").json()["running_requests"] == 0
    assert not (server.steering_dir / "fresh.safetensors").exists()
    with pytest.raises(openai.BadRequestError):
        _greedy(server.client(), steering="fresh")


def _stream(server, body: dict, key: str = API_KEY):
    """Start a streaming completion; returns (first_chunk_arrived event, result dict, thread)."""
    arrived, result = threading.Event(), {}

    def run():
        body_with_usage = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with server.http(key).stream("POST", "/v1/completions", json=body_with_usage) as resp:
            text = []
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    text += [c["text"] for c in chunk["choices"]]
                    result["tokens"] = (chunk.get("usage") or {}).get("completion_tokens")
                    arrived.set()
            result["text"], result["status"] = "".join(text), resp.status_code
        arrived.set()

    thread = threading.Thread(target=run)
    thread.start()
    return arrived, result, thread


def test_hot_delete_keeps_running_requests_on_their_profile(server):
    admin = server.http(key=ADMIN_KEY)
    hot = SteeringProfile.for_config(CONFIG, name="hot", bias=expert_bias(CONFIG, 6, 2.0), alpha=3.0).to_bytes()
    other = SteeringProfile.for_config(CONFIG, name="other", exclude={l: [6] for l in range(LAYERS)}).to_bytes()
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "steering": "hot"}
    assert admin.post("/v1/steering/profiles", content=hot).status_code == 201
    expected = server.http().post("/v1/completions", json=body).json()["choices"][0]["text"]
    before = server.admitted("hot")
    uploaded = {}
    # With the engine frozen the request cannot finish, however fast the machine: it is admitted
    # (its profile pinned) but takes no step until the block ends.
    with server.engine_frozen():
        _, result, thread = _stream(server, body)
        server.wait_admitted("hot", before + 1)
        deleted = admin.delete("/v1/steering/profiles/hot").json()
        # The upload picks its row now; its push to the engine waits in the engine's queue behind the
        # request, so the row is written before the request's first step.
        upload = threading.Thread(target=lambda: uploaded.update(
            status=admin.post("/v1/steering/profiles", content=other).status_code))
        upload.start()
    assert deleted["running_requests"] == 1  # still running when its profile went away
    upload.join(120)
    thread.join(120)
    assert uploaded["status"] == 201  # and it did not take hot's row:
    assert result["text"] == expected
    with pytest.raises(openai.BadRequestError):
        _greedy(server.client(), steering="hot")
    assert admin.delete("/v1/steering/profiles/other").status_code == 200


def test_hostile_uploads_write_nothing(server):
    admin = server.http(key=ADMIN_KEY)
    before = sorted(p.name for p in server.steering_dir.iterdir())
    evil_profile = SteeringProfile.for_config(CONFIG, name="ok")
    evil_profile.name = "../x"  # to_bytes does not validate: a hand-made hostile file
    evil = evil_profile.to_bytes()
    r1 = admin.post("/v1/steering/profiles", content=evil)
    r2 = admin.post("/v1/steering/profiles", content=b"\0" * (9 << 20))
    r3 = admin.post("/v1/steering/profiles", content=b"garbage")
    other = SteeringProfile.for_config(tiny_config(num_experts=16), name="other").to_bytes()
    r4 = admin.post("/v1/steering/profiles", content=other)
    assert [r.status_code for r in (r1, r2, r3, r4)] == [400, 413, 400, 400]
    assert "invalid profile name '../x'" in _error(r1)["message"]
    assert "made for another model" in _error(r4)["message"]
    assert admin.delete("/v1/steering/profiles/..%2Fx").status_code in (400, 404)
    assert sorted(p.name for p in server.steering_dir.iterdir()) == before
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_pool_metrics_count_computed_tokens(server):
    client = server.client()
    computed = 0

    def requests():
        nonlocal computed
        for prompt, n in (("hello world", 5), (PROMPT, 9), ("x = 1", 1)):
            out = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0,
                                            extra_body={"ignore_eos": True, "steering": "push-e5",
                                                        "probes": ["always"]})  # its metrics: listed too
            computed += out.usage.prompt_tokens + out.usage.completion_tokens - 1  # the last token is never fed back

    _, routing = server.routing_of(requests)
    assert sum(routing.values()) == computed * LAYERS * TOP_K  # exact: every scrape reads the engine first
    text = httpx.get(f"{server.url}/metrics").text
    assert 'unipool_steering_requests_total{profile="push-e5"}' in text
    assert "vllm:num_requests_running" in text
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    names = open("deploy/observability/metric_names.txt").read().split()
    missing = [n for n in names if n.startswith("unipool_") and not any(e == n or e.startswith(n) for e in exported)]
    assert not missing, missing


def test_expert_budget_field(server):
    client = server.client()
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0,
                                    extra_body={"expert_budget": {"top_k": 1}})  # = the model's k: accepted
    assert out.usage.completion_tokens >= 1
    for budget, message in (({"top_k": 0}, "no shared expert"), ({"top_k": 5}, "exceeds the model's top_k=1"),
                            ({"top_k": "1"}, "expert_budget"), ({"k": 1}, "expert_budget")):
        resp = server.http().post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2,
                                                           "expert_budget": budget})
        assert resp.status_code == 400 and message in _error(resp)["message"], resp.text
