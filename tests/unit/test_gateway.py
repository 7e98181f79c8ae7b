"""The gateway in front of vLLM's routes, without an engine: keys, route classes, the steering fields."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI

from unipool_serve.server.enforcement import CURRENT_REQUEST
from unipool_serve.server.gateway import APIGateway
from unipool_serve.server.policy import AccessPolicy


def _app() -> FastAPI:
    app = FastAPI()
    for path in ("/v1/completions", "/v1/responses", "/v1/steering/profiles", "/collective_rpc", "/some_new_vllm_route"):
        app.add_api_route(path, lambda: None, methods=["POST"])
    app.add_api_route("/v1/responses/{response_id}", lambda: None, methods=["GET"])
    app.add_api_route("/health", lambda: None, methods=["GET"])
    return app


def _call(policy: AccessPolicy, body: bytes | dict | None = None, key: str | None = None, path="/v1/completions",
          method="POST", content_type=b"application/json"):
    """(status, what the app saw: body and request context) or (status, the error envelope)."""
    seen = {}

    async def app(scope, receive, send):
        message = await receive()
        seen["body"] = message.get("body", b"")
        seen["context"] = CURRENT_REQUEST.get()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    gateway = APIGateway(app, _app().router, policy)
    raw = json.dumps(body).encode() if isinstance(body, dict) else (body or b"")
    messages = [{"type": "http.request", "body": raw, "more_body": False}]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    headers = [(b"content-type", content_type)] + ([(b"authorization", f"Bearer {key}".encode())] if key else [])
    asyncio.run(gateway({"type": "http", "path": path, "method": method, "headers": headers}, receive, send))
    status = sent[0]["status"]
    if status != 200:
        return status, json.loads(sent[1]["body"])["error"]
    return status, seen


KEYS = AccessPolicy.parse(["k1", "kid=a"], "root")


def test_the_steering_field_moves_from_the_body_into_the_request_context():
    status, seen = _call(AccessPolicy(), {"model": "m", "prompt": "x", "steering": "b", "cache_salt": "mine"})
    assert status == 200 and json.loads(seen["body"]) == {"model": "m", "prompt": "x", "cache_salt": "mine"}
    assert seen["context"].asked == "b" and seen["context"].bound is None
    _, via_xargs = _call(AccessPolicy(), {"model": "m", "prompt": "x", "vllm_xargs": {"steering": "b", "n": 1}})
    assert json.loads(via_xargs["body"]) == {"model": "m", "prompt": "x", "vllm_xargs": {"n": 1}}
    assert via_xargs["context"].asked == "b"
    _, budgeted = _call(AccessPolicy(), {"model": "m", "prompt": "x", "expert_budget": {"top_k": 1}})
    assert json.loads(budgeted["body"]) == {"model": "m", "prompt": "x"} and budgeted["context"].budget == 1
    raw = json.dumps({"model": "m", "prompt": "x"}).encode()
    _, plain = _call(AccessPolicy(), raw)
    assert plain["body"] == raw and plain["context"].asked is None  # untouched, byte for byte


def test_a_json_body_is_read_whatever_its_content_type_says():
    # some vLLM routes parse the body themselves regardless of the header: no hiding behind it
    _, seen = _call(AccessPolicy(), {"prompt": "x", "steering": "b"}, content_type=b"text/plain")
    assert seen["context"].asked == "b"


def test_keys_and_bindings():
    assert _call(KEYS, {"prompt": "x"})[0] == 401
    assert _call(KEYS, {"prompt": "x"}, key="nope")[0] == 401
    status, seen = _call(KEYS, {"prompt": "x"}, key="kid")
    assert status == 200 and seen["context"].bound == "a"
    status, error = _call(KEYS, {"prompt": "x", "steering": "b"}, key="kid")
    assert status == 403 and error["code"] == "steering_override_forbidden"
    assert _call(KEYS, {"prompt": "x", "steering": "a"}, key="kid")[0] == 200  # naming its own profile is fine
    status, seen = _call(KEYS, {"prompt": "x"}, key="root")
    assert status == 200 and seen["context"].is_admin


@pytest.mark.parametrize("body,code", [
    ({"prompt": "x", "steering": ["a"]}, "invalid_steering_field"),
    ({"prompt": "x", "steering": {"a": 1}}, "invalid_steering_field"),
    ({"prompt": "x", "steering": "../etc"}, "invalid_steering_field"),
    ({"prompt": "x", "steering": "a", "vllm_xargs": {"steering": "b"}}, "conflicting_steering"),
    ({"prompt": "x", "vllm_xargs": {"unipool_steering_slot": 1}}, "reserved_vllm_xargs"),
    ({"prompt": "x", "vllm_xargs": {"unipool_anything": "x"}}, "reserved_vllm_xargs"),
    ({"prompt": "x", "expert_budget": {"top_k": -1}}, "invalid_expert_budget"),
    ({"prompt": "x", "expert_budget": {"top_k": True}}, "invalid_expert_budget"),
    ({"prompt": "x", "expert_budget": 1}, "invalid_expert_budget"),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "invalid_body"),
    (b"\xff\xfe{}", "invalid_body"),
    (b"{not json", "invalid_json"),
], ids=["list", "dict", "path", "conflict", "reserved-slot", "reserved-any", "budget-negative", "budget-bool",
        "budget-int", "deep", "utf8", "json"])
def test_bad_steering_input_is_a_400_in_the_envelope(body, code):
    status, error = _call(KEYS, body, key="k1")
    assert status == 400 and error["code"] == code and error["message"]


def test_responses_nulls_take_defaults_and_empty_messages_are_refused():
    # vLLM 0.32's Responses API breaks on these (a stream cut after its headers; a 500)
    _, seen = _call(AccessPolicy(), {"model": "m", "input": "x", "background": None, "truncation": None},
                    path="/v1/responses")
    assert json.loads(seen["body"]) == {"model": "m", "input": "x"}
    _, kept = _call(AccessPolicy(), {"model": "m", "prompt": "x", "user": None})
    assert json.loads(kept["body"]) == {"model": "m", "prompt": "x", "user": None}  # other routes: untouched
    status, error = _call(AccessPolicy(), {"model": "m", "input": [
        {"role": "user", "content": "hi"}, {"type": "message", "role": "assistant", "content": []}]},
        path="/v1/responses")
    assert status == 400 and error["param"] == "input[1].content"


def test_route_classes():
    # unknown routes (a future vLLM route, dev-mode RPC) need the admin key; probes need no key
    for path in ("/collective_rpc", "/some_new_vllm_route"):
        status, error = _call(KEYS, {}, key="k1", path=path)
        assert status == 403 and error["code"] == "admin_required"
        assert _call(KEYS, {}, key="root", path=path)[0] == 200
        status, error = _call(AccessPolicy(), {}, path=path)  # open mode without an admin key: nobody
        assert status == 403 and error["code"] == "admin_disabled"
    assert _call(KEYS, None, path="/health", method="GET")[0] == 200
    assert _call(KEYS, None, key="k1", path="/v1/responses/abc", method="GET")[0] == 200  # templates match
    assert _call(KEYS, None, path="/v1/responses/abc", method="GET")[0] == 401


def test_profile_uploads_pass_as_raw_bytes():
    raw = b"{\x00 binary profile file"
    status, seen = _call(KEYS, raw, key="root", path="/v1/steering/profiles", content_type=b"application/octet-stream")
    assert status == 200 and seen["body"] == raw


def test_policy_refuses_inconsistent_keys():
    for keys, admin, message in ((["a", "a=p"], None, "given twice"), (["a"], "a", "admin-key equals"),
                                 ([" a"], None, "surrounding spaces"), (["=p"], None, "empty"),
                                 ([], " root", "surrounding spaces")):
        with pytest.raises(ValueError, match=message):
            AccessPolicy.parse(keys, admin)


@pytest.mark.parametrize("failure", ["raises", "hangs"])
def test_a_capture_the_engine_does_not_hand_over_still_ends_the_response(monkeypatch, failure):
    """A take that fails or never answers (a stuck engine) must not hold the response open: the body
    goes out, each choice saying why it has no capture."""
    import asyncio
    import json

    from unipool_serve.server import capture
    from unipool_serve.server.enforcement import RequestContext

    async def take(engine_ids):
        if failure == "raises":
            raise RuntimeError("engine gone")
        await asyncio.Event().wait()  # never answers

    monkeypatch.setattr(capture, "TAKE_TIMEOUT_S", 0.01)
    sent = []

    async def send(message):
        sent.append(message)

    async def respond():
        ctx = RequestContext(capture=1, captured={("cmpl-1", 0): "engine-1"})
        wrapped = capture.CaptureResponse(send, ctx, take)
        body = json.dumps({"choices": [{"index": 0, "text": "hi"}]}).encode()
        await wrapped({"type": "http.response.start", "status": 200,
                       "headers": [(b"content-type", b"application/json")]})
        await wrapped({"type": "http.response.body", "body": body, "more_body": False})

    asyncio.run(respond())
    choice = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))["choices"][0]
    assert choice["text"] == "hi" and "routed_experts" not in choice
    assert "routing capture" in choice["routing_capture_error"]
