"""The server logits source against a fake unipool-serve (httpx.MockTransport), per the capture contract.

The fake renders chats as "role: content\\n" lines plus "assistant:", tokenizes one token per
character (plus a leading BOS id for plain prompts), and returns router_logits whose
value at [t, l, e] is the prompt position t: so a test can see exactly which tokens came back.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import torch

from unipool_serve.demo.tiny_model import tiny_config
from unipool_serve.model_executor.steering.fit.data import Example
from unipool_serve.model_executor.steering.fit.server import ServerSource
from unipool_serve.model_executor.steering.fit.sources import FitSourceError, final_user_span
from unipool_serve.model_executor.steering.profile import SteeringProfile

L, E, BOS, ADMIN = 3, 8, 1, "admin-secret"


def render(messages) -> str:
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def encoded(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return base64.b64encode(buffer.getvalue()).decode()


class FakeServer:
    def __init__(self, capture: bool = True):
        self.capture, self.requests, self.profiles = capture, [], {}

    def tokens(self, body) -> list[int]:
        if "messages" in body:
            return [ord(c) for c in render(body["messages"])]
        return [BOS] + [ord(c) for c in body["prompt"]]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.headers.get("content-type") == "application/json" else None
        self.requests.append((request.method, request.url.path, body, request.headers.get("authorization")))
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "fake-moe"}]})
        if path == "/tokenize":
            return httpx.Response(200, json={"tokens": self.tokens(body), "count": len(self.tokens(body))})
        if path.startswith("/v1/steering/profiles"):
            if request.headers.get("authorization") != f"Bearer {ADMIN}":
                return httpx.Response(403, json={"error": {"message": "this operation needs the admin key"}})
            if request.method == "POST":
                profile = SteeringProfile.from_bytes(request.content)
                self.profiles[profile.name] = profile
            else:
                self.profiles.pop(path.rsplit("/", 1)[-1])
            return httpx.Response(201, json={})
        if body.get("prompt") == "refuse me":
            return httpx.Response(400, json={"error": {"message": "prompt too long for router_logits (limit 1 MiB)"}})
        prompt = self.tokens(body)
        if body.get("max_tokens") == 1:  # a capture
            start = body.get("routed_experts_prompt_start", 0)
            logits = np.broadcast_to(np.arange(len(prompt), dtype=np.float16)[:, None, None], (len(prompt), L, E))
            choice = {"text": "x", "message": {"content": "x"}}
            if self.capture and body.get("return_router_logits"):
                choice["router_logits"] = encoded(np.ascontiguousarray(logits[start:]))
            return httpx.Response(200, json={"choices": [choice], "usage": {"prompt_tokens": len(prompt)}})
        text = f"steered by {body['steering']}" if "steering" in body else "plain"
        return httpx.Response(200, json={"choices": [{"text": text, "message": {"content": text}}]})


def source(fake: FakeServer, **kw) -> ServerSource:
    return ServerSource("http://fake:8000/", transport=httpx.MockTransport(fake), **kw)


def test_plain_prompt_captures_every_prompt_token():
    fake = FakeServer()
    [trace] = source(fake).capture([Example(label=1, prompt="def f():")], progress=False)
    assert trace.dtype == torch.float16 and tuple(trace.shape) == (1 + len("def f():"), L, E)  # as sent
    assert trace[:, 0, 0].tolist() == list(range(trace.shape[0]))
    method, path, body, _ = fake.requests[-1]
    assert (method, path) == ("POST", "/v1/completions")
    assert body["model"] == "fake-moe" and body["max_tokens"] == 1 and body["return_router_logits"] is True


def test_chat_captures_the_final_user_message_only():
    fake = FakeServer()
    chat = (("system", "be brief"), ("user", "first question"), ("assistant", "an answer"), ("user", "last one"))
    [trace] = source(fake).capture([Example(label=0, messages=chat)], progress=False)
    text = render([{"role": r, "content": c} for r, c in chat])
    start = text.rindex("last one")
    assert trace[:, 0, 0].tolist() == list(range(start, start + len("last one")))
    _, path, body, _ = fake.requests[-1]
    assert path == "/v1/chat/completions" and body["routed_experts_prompt_start"] == start
    assert body["messages"][-1] == {"role": "user", "content": "last one"}


def test_final_user_span():
    full, blank = [5, 6, 7, 8, 9, 10], [5, 6, 9, 10]
    assert final_user_span(full, blank) == (2, 4)
    assert final_user_span([1, 2, 3], [1, 3]) == (1, 2)
    with pytest.raises(FitSourceError, match="no tokens of its own"):
        final_user_span([1, 2], [1, 2])


def test_a_server_without_capture_is_named():
    with pytest.raises(FitSourceError, match="does not support per-request routing capture"):
        source(FakeServer(capture=False)).capture([Example(label=1, prompt="x")], progress=False)


def test_http_errors_carry_the_servers_message():
    with pytest.raises(FitSourceError, match=r"HTTP 400: prompt too long for router_logits \(limit 1 MiB\)"):
        source(FakeServer()).capture([Example(label=1, prompt="refuse me")], progress=False)


def test_judged_generation_uploads_a_candidate_and_removes_it():
    fake = FakeServer()
    served = SteeringProfile.for_config(tiny_config(num_hidden_layers=L, num_experts=E), name="safe",
                                        bias=torch.ones(L, E), alpha=2.0)
    examples = [Example(label=1, prompt="a"), Example(label=1, messages=(("user", "b"),))]
    texts = source(fake, admin_key=ADMIN).generate(examples, served, 8, progress=False)
    uploads = [r for r in fake.requests if r[:2] == ("POST", "/v1/steering/profiles")]
    assert len(uploads) == 1 and uploads[0][3] == f"Bearer {ADMIN}"
    candidate = texts[0].removeprefix("steered by ")
    assert texts == [f"steered by {candidate}"] * 2
    assert candidate != "safe" and candidate.startswith("safe.fit-candidate-")  # never replaces a served profile
    assert fake.requests[-1][:2] == ("DELETE", f"/v1/steering/profiles/{candidate}") and not fake.profiles
    bodies = [r[2] for r in fake.requests if r[1] in ("/v1/completions", "/v1/chat/completions")]
    assert all(b["max_tokens"] == b["min_tokens"] == 8 and b["temperature"] == 0 for b in bodies)
    assert source(fake).generate(examples[:1], None, 4, progress=False) == ["plain"]
    with pytest.raises(FitSourceError, match="pass --admin-key"):
        source(fake).generate(examples, served, 8, progress=False)
