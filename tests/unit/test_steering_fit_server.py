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
from unipool_serve.tools.fit.data import Example
from unipool_serve.tools.fit.server import ServerSource
from unipool_serve.tools.fit.sources import FitSourceError, final_user_span
from unipool_serve.model_executor.steering.profile import SteeringProfile

pytestmark = pytest.mark.usefixtures("one_torch_thread")
L, E, BOS, ADMIN, SPIKE = 3, 8, 1, "admin-secret", 3


def render(messages) -> str:
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def encoded(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return base64.b64encode(buffer.getvalue()).decode()


class FakeServer:
    """`broken`: path -> the (malformed) JSON body, or an httpx.Response, answered there instead.
    `signal`: a '@' character spikes expert SPIKE of layer 1 (and the position values vanish
    under the surrogate's LayerNorm), so a fit has something to find."""

    def __init__(self, capture: bool = True, broken: dict | None = None, signal: bool = False, experts: int = E):
        self.capture, self.requests, self.profiles = capture, [], {}
        self.broken, self.signal, self.experts = broken or {}, signal, experts

    def tokens(self, body) -> list[int]:
        if "messages" in body:
            return [ord(c) for c in render(body["messages"])]
        return [BOS] + [ord(c) for c in body["prompt"]]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.headers.get("content-type") == "application/json" else None
        self.requests.append((request.method, request.url.path, body, request.headers.get("authorization")))
        path = request.url.path
        if path in self.broken:
            answer = self.broken[path]
            return answer if isinstance(answer, httpx.Response) else httpx.Response(200, json=answer)
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "fake-moe"}]})
        if path == "/ready":  # a server that does not report its model's fingerprint: fit checks shapes only
            return httpx.Response(200, json={"status": "ready"})
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
            logits = np.broadcast_to(np.arange(len(prompt), dtype=np.float16)[:, None, None], (len(prompt), L, self.experts))
            if self.signal:
                logits = logits.copy()
                logits[[t == ord("@") for t in prompt], 1, SPIKE] += 6.0
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


def npy(array) -> str:
    return encoded(np.asarray(array))


CAPTURED = {"usage": {"prompt_tokens": 2}}


@pytest.mark.parametrize("broken, message", [
    ({"/v1/models": []}, "/v1/models: the answer is not a JSON object"),
    ({"/v1/models": {"data": [{"name": "m"}]}}, "answered without a valid data[0].id"),
    ({"/v1/models": httpx.Response(200, text="<html>")}, "the answer is not a JSON object"),
    ({"/v1/completions": {"choices": [{"router_logits": "x"}]}}, "without a valid usage.prompt_tokens"),
    ({"/v1/completions": {"choices": [], **CAPTURED}}, "without a valid choices[0]"),
    ({"/v1/completions": {"choices": [{"router_logits": "bm90IG5weQ=="}], **CAPTURED}}, "not a base64 .npy array"),
    ({"/v1/completions": {"choices": [{"router_logits": npy([[["a"] * E] * L] * 2)}], **CAPTURED}},
     "expected floats [tokens, layers, experts]"),
    ({"/v1/completions": {"choices": [{"router_logits": npy(np.full((2, L, E), np.inf, np.float16))}], **CAPTURED}},
     "non-finite"),
    ({"/v1/completions": {"choices": [{"router_logits": npy(np.zeros((1, L, E), np.float16))}], **CAPTURED}},
     "router_logits for 1 tokens, expected at least 2"),
])
def test_malformed_answers_are_named(broken, message):
    with pytest.raises(FitSourceError) as err:
        source(FakeServer(broken=broken)).capture([Example(label=1, prompt="x", line=7)], progress=False)
    assert message in str(err.value)


@pytest.mark.parametrize("broken, message", [
    ({"/tokenize": {"tokens": "abc"}}, "without a valid tokens"),
    ({"/tokenize": {"tokens": [1, "2"]}}, "tokens that are not integers"),
])
def test_malformed_tokenize_answers_are_named(broken, message):
    with pytest.raises(FitSourceError, match=message):
        source(FakeServer(broken=broken)).capture([Example(label=1, messages=(("user", "b"),))], progress=False)


def test_malformed_generation_answers_are_named():
    fake = FakeServer(broken={"/v1/completions": {"choices": [{"text": None}]},
                              "/v1/chat/completions": {"choices": [{"text": "no message"}]}})
    with pytest.raises(FitSourceError, match=r"answered without a valid choices\[0\]\.text"):
        source(fake).generate([Example(label=1, prompt="a")], None, 4, progress=False)
    with pytest.raises(FitSourceError, match=r"answered without a valid choices\[0\]\.message"):
        source(fake).generate([Example(label=1, messages=(("user", "b"),))], None, 4, progress=False)


# ---- the CLI through --server (the fake behind the real ServerSource) ------------------
@pytest.fixture
def cli_with(monkeypatch, tiny_model_factory, tmp_path, capsys):
    """run(fake, *extra) -> (exit code, stdout, stderr) of `fit --server` on 10 + 10 prompts."""
    from unipool_serve.tools.steering_cli import main as steering_cli
    from unipool_serve.tools.fit import server as server_mod

    folder = tiny_model_factory("fit-server", num_hidden_layers=L, num_experts=E)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"case {i}" + (" @ then @" if y else " plain"), "label": y}) + "\n"
                            for i in range(10) for y in (1, 0)))
    capsys.readouterr()

    def run(fake: FakeServer, *extra: str):
        real = server_mod.ServerSource
        monkeypatch.setattr(server_mod, "ServerSource",
                            lambda url, **kw: real(url, transport=httpx.MockTransport(fake), **kw))
        argv = ["fit", "--model", str(folder), "--server", "http://fake:8000", "--data", str(data), "--name", "calm",
                "--out", str(tmp_path / "calm.safetensors"), "--lambda", "1e-3", "--alpha", "1", "2",
                "--surrogate-epochs", "30", "--bias-epochs", "40", "--no-progress", *extra]
        code = steering_cli(argv)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def test_cli_fits_through_a_server(cli_with, tmp_path):
    code, out, err = cli_with(FakeServer(signal=True))
    assert code == 0, err
    profile = SteeringProfile.load(tmp_path / "calm.safetensors")
    assert profile.provenance["source"] == "server http://fake:8000"
    # whichever kind the surrogate chose, the marker's expert is pushed down or excluded
    assert profile.bias[1, SPIKE] < 0 or SPIKE in profile.exclude.get(1, []), profile.provenance["kind"]
    assert "| unsteered" in out


@pytest.mark.parametrize("broken, message", [
    ({"/v1/completions": {"choices": [{"router_logits": "%%"}], **CAPTURED}}, "not a base64 .npy array"),
    ({"/v1/completions": httpx.Response(500, text="Internal Server Error")}, "HTTP 500: Internal Server Error"),
])
def test_cli_server_errors_are_one_line_and_write_nothing(cli_with, tmp_path, broken, message):
    code, out, err = cli_with(FakeServer(broken=broken))
    assert code == 2 and err.count("\n") == 1 and err.startswith("unipool-steering fit: error: ") and message in err
    assert not list(tmp_path.glob("calm.safetensors*"))


def test_cli_refuses_logits_of_another_shape(cli_with):
    code, _, err = cli_with(FakeServer(experts=E + 1))
    assert code == 2 and "router logits for [3, 9] (layers, experts) but the model folder is for [3, 8]" in err
