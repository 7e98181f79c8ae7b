"""`unipool-serve` end to end: a real process, real HTTP, the official `openai` client.

One server for the whole module (engine starts are expensive here); the shutdown
test runs last because it stops it.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time

import httpx
import openai
import pytest

from unipool_serve.model_executor.steering.profile import SteeringProfile
from unipool_serve.demo.tiny_model import tiny_config

from server_process import ADMIN_KEY, API_KEY, BOUND_KEY, expert_bias

pytestmark = pytest.mark.server
PROMPT = "def add(a, b):"


def _error(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


def _metric_samples(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_ready_was_503_while_loading_then_200(server):
    assert 503 in server.ready_codes and server.ready_codes[-1] == 200
    body = httpx.get(f"{server.url}/ready").json()
    assert body["steering_profiles"] == ["no-e0", "no-e1", "push-e5"]
    assert "broken.safetensors" in body["profile_load_errors"]  # reported, not fatal
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_completion_chat_and_streaming_with_usage(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    done = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    assert done.usage.completion_tokens == 8 and done.choices[0].text
    n2 = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, n=2, temperature=1.0, seed=1, logprobs=2)
    assert len(n2.choices) == 2 and len(n2.choices[0].logprobs.token_logprobs) == 4  # (top_logprobs is keyed by text)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 6
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=7, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 7
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text[: len("".join(
        c.choices[0].text for c in chunks if c.choices))]


def test_auth(server):
    assert server.http(key=None).post("/v1/completions", json={"model": "tiny", "prompt": "x"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").completions.create(model="tiny", prompt="x", max_tokens=1)
    assert httpx.get(f"{server.url}/metrics").status_code == 200  # scrapes need no key


def _greedy(client, steering=None, xargs=None, prompt=PROMPT):
    extra = {}
    if steering is not None:
        extra["steering"] = steering
    if xargs is not None:
        extra["vllm_xargs"] = xargs
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, extra_body=extra)
    return out.choices[0].text


def test_steering_by_field_and_by_vllm_xargs(server):
    client = server.client()
    plain = _greedy(client)
    by_field = _greedy(client, steering="push-e5")
    assert by_field == _greedy(client, xargs={"steering": "push-e5"})
    assert by_field != plain  # a 2.0-alpha push on one expert in every layer changes this tiny model's output
    with pytest.raises(openai.BadRequestError) as err:
        _greedy(client, steering="nope")
    assert "available profiles: ['no-e0', 'no-e1', 'push-e5']" in str(err.value)
    with pytest.raises(openai.BadRequestError):
        _greedy(client, steering="no-e0", xargs={"steering": "no-e1"})
    with pytest.raises(openai.BadRequestError):
        _greedy(client, xargs={"unipool_steering_slot": 1})


def test_key_bound_profile(server):
    bound = server.client(key=BOUND_KEY)
    assert _greedy(bound) == _greedy(server.client(), steering="no-e0")
    assert _greedy(bound, steering="no-e0") == _greedy(bound)
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
    listed = http.get("/v1/steering/profiles").json()
    assert [p["id"] for p in listed["data"]] == ["no-e0", "no-e1", "push-e5"]
    detail = http.get("/v1/steering/profiles/no-e1").json()
    assert detail["layers"][0]["exclude"] == [1]
    assert _error(http.get("/v1/steering/profiles/missing"))["code"] == "steering_profile_not_found"

    config = tiny_config()
    data = SteeringProfile.for_config(config, name="fresh", exclude={0: [2]}).to_bytes()
    assert http.post("/v1/steering/profiles", content=data).status_code == 403  # not admin
    assert admin.post("/v1/steering/profiles", content=data).status_code == 201
    assert (server.steering_dir / "fresh.safetensors").exists()
    _greedy(server.client(), steering="fresh")  # accepted: an unknown profile would raise BadRequestError
    assert admin.post("/v1/steering/profiles", content=data).status_code == 409
    assert http.delete("/v1/steering/profiles/fresh").status_code == 403
    assert admin.delete("/v1/steering/profiles/fresh").status_code == 200
    assert not (server.steering_dir / "fresh.safetensors").exists()
    with pytest.raises(openai.BadRequestError):
        _greedy(server.client(), steering="fresh")


def test_hot_delete_keeps_running_requests_on_their_profile(server):
    admin, config = server.http(key=ADMIN_KEY), tiny_config()
    hot = SteeringProfile.for_config(config, name="hot", bias=expert_bias(config, 6, 2.0), alpha=3.0).to_bytes()
    other = SteeringProfile.for_config(config, name="other", exclude={l: [6] for l in range(4)}).to_bytes()
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 150, "temperature": 0, "ignore_eos": True,
            "steering": "hot"}
    assert admin.post("/v1/steering/profiles", content=hot).status_code == 201
    expected = server.http().post("/v1/completions", json=body).json()["choices"][0]["text"]
    result = {}

    def run():
        result["text"] = server.http().post("/v1/completions", json=body).json()["choices"][0]["text"]

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(0.5)
    assert worker.is_alive()  # the request is still running when its profile is deleted
    assert admin.delete("/v1/steering/profiles/hot").status_code == 200
    assert admin.post("/v1/steering/profiles", content=other).status_code == 201  # must not take hot's row
    worker.join(timeout=120)
    assert result["text"] == expected
    with pytest.raises(openai.BadRequestError):
        _greedy(server.client(), steering="hot")
    assert admin.delete("/v1/steering/profiles/other").status_code == 200


def test_hostile_uploads_write_nothing(server):
    admin = server.http(key=ADMIN_KEY)
    before = sorted(p.name for p in server.steering_dir.iterdir())
    config = tiny_config()
    evil_profile = SteeringProfile.for_config(config, name="ok")
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
    def totals():
        text = httpx.get(f"{server.url}/metrics").text
        return sum(_metric_samples(text, "unipool_expert_tokens_total").values()), text

    time.sleep(1.2)  # let the poller catch up with earlier tests
    start, _ = totals()
    client = server.client()
    computed = 0
    for prompt, n in (("hello world", 5), (PROMPT, 9), ("x = 1", 1)):
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, extra_body={"ignore_eos": True})
        computed += out.usage.prompt_tokens + out.usage.completion_tokens - 1  # the last token is never fed back
    config = tiny_config()
    expected = start + computed * config.num_hidden_layers * config.num_experts_per_tok
    deadline = time.monotonic() + 15
    while (current := totals())[0] != expected and time.monotonic() < deadline:
        time.sleep(0.3)
    total, text = current
    assert total == expected
    assert 'unipool_steering_requests_total{profile="push-e5"}' in text
    assert re.search(r'unipool_layer_load_imbalance_ratio\{layer="0"\} [0-9.]+', text)
    assert re.search(r'unipool_pool_active_experts_ratio\{pool="0"\} [0-9.]+', text)
    assert "vllm:num_requests_running" in text
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    names = open("deploy/observability/metric_names.txt").read().split()
    ours = [n for n in names if n.startswith("unipool_")]
    missing = [n for n in ours if not any(e == n or e.startswith(n) for e in exported)]
    assert not missing, missing


def test_disconnecting_stream_clients_leave_nothing_running(server):
    def stream_then_drop():
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
            body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 200, "stream": True, "ignore_eos": True}
            with c.stream("POST", "/v1/completions", json=body) as resp:
                for i, _ in enumerate(resp.iter_lines()):
                    if i >= 5:
                        break  # leaving the block closes the connection mid-stream

    threads = [threading.Thread(target=stream_then_drop) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deadline = time.monotonic() + 30
    running = None
    while time.monotonic() < deadline:
        text = httpx.get(f"{server.url}/metrics").text
        running = sum(_metric_samples(text, "vllm:num_requests_running").values())
        if running == 0:
            break
        time.sleep(0.5)
    assert running == 0
    _greedy(server.client())  # still answering (raises otherwise)


def test_schema_fuzzing_gives_no_5xx(server):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, settings

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    paths = ("/v1/completions", "/v1/chat/completions", "/v1/steering/profiles", "/v1/models")
    failures = []
    for path in paths:
        for operation in schema[path].values() if path in schema else []:
            strategy = operation.as_strategy()

            @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def check(case):
                case.headers = {**(case.headers or {}), "Authorization": f"Bearer {API_KEY}"}
                if case.body is not None and isinstance(case.body, dict):
                    case.body.setdefault("max_tokens", 2)
                resp = case.call(base_url=server.url, timeout=60)
                if resp.status_code >= 500:
                    failures.append((path, resp.status_code, resp.text[:300]))
                elif resp.status_code >= 400:
                    body = resp.json()
                    if "error" not in body or "message" not in body["error"]:
                        failures.append((path, resp.status_code, resp.text[:300]))

            from hypothesis import given

            given(strategy)(check)()
    assert not failures, failures[:5]


def test_sigterm_drains_and_exits_zero(server):
    client = server.client()
    result = {}

    def long_request():
        out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=120, temperature=0,
                                        extra_body={"ignore_eos": True})
        result["tokens"] = out.usage.completion_tokens

    worker = threading.Thread(target=long_request)
    worker.start()
    time.sleep(1.0)
    server.proc.send_signal(signal.SIGTERM)
    worker.join(timeout=60)
    assert server.proc.wait(timeout=60) == 0, server.log.read_text()[-3000:]
    assert result.get("tokens") == 120  # the running request finished
