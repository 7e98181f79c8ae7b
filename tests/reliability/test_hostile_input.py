"""Hostile input on every route of the live app: a 4xx in the OpenAI envelope, a connection that
stays open, and no traceback in the log. Then schemathesis over the whole live schema."""

from __future__ import annotations

import json

import httpx
import pytest
import requests

from server_process import ADMIN_KEY, API_KEY, BOUND_KEY

pytestmark = pytest.mark.server
JSON = "application/json"
BODIES = [  # (name, raw body, content type)
    ("empty", b"", JSON),
    ("truncated", b'{"model": "tiny", "prompt": ', JSON),
    ("not-utf8", b'{"prompt": "\xff\xfe"}', JSON),
    ("deep-array", b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", JSON),
    ("deep-object", b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, JSON),
    ("array", b"[]", JSON),
    ("string", b'"x"', JSON),
    ("number", b"7", JSON),
    ("null", b"null", JSON),
    ("prompt-number", b'{"model": "tiny", "prompt": 7}', JSON),
    ("prompt-nested", b'{"model": "tiny", "prompt": [[[1]]]}', JSON),
    ("messages-string", b'{"model": "tiny", "messages": "x"}', JSON),
    ("steering-list", b'{"model": "tiny", "prompt": "x", "steering": ["no-e0"]}', JSON),
    ("steering-object", b'{"model": "tiny", "prompt": "x", "steering": {"a": 1}}', JSON),
    ("steering-number", b'{"model": "tiny", "prompt": "x", "steering": 7}', JSON),
    ("steering-empty", b'{"model": "tiny", "prompt": "x", "steering": ""}', JSON),
    ("xargs-string", b'{"model": "tiny", "prompt": "x", "vllm_xargs": "x"}', JSON),
    ("xargs-reserved", b'{"model": "tiny", "prompt": "x", "vllm_xargs": {"unipool_steering_slot": 1}}', JSON),
    ("negative-tokens", b'{"model": "tiny", "prompt": "x", "max_tokens": -1}', JSON),
    ("huge-tokens", b'{"model": "tiny", "prompt": "x", "max_tokens": 1e30}', JSON),
    ("huge-n", b'{"model": "tiny", "prompt": "x", "n": 1000000000}', JSON),
    ("bad-salt-steered", b'{"model": "tiny", "prompt": "x", "cache_salt": "a/b@c", "steering": "no-e0"}', JSON),
    ("unknown-fields", b'{"model": "tiny", "prompt": "x", "max_tokens": 1, "zzz": {"yyy": [1]}}', JSON),
    # null where vLLM's response model wants a value (found by the full fuzzing run on /v1/responses)
    ("nulls-streamed", b'{"model": "tiny", "input": "x", "prompt": "x", "stream": true, "max_tokens": 1, '
                       b'"max_output_tokens": 1, "background": null, "truncation": null}', JSON),
    ("empty-message", b'{"model": "tiny", "input": [{"type": "message", "role": "assistant", "content": []}]}', JSON),
    # grammars that require a character outside ASCII (an ASCII-only tokenizer cannot continue them)
    ("grammar-non-ascii", '{"model": "tiny", "prompt": "x", "input": "x", "max_tokens": 2, "max_output_tokens": 2, '
                          '"structured_outputs": {"regex": "é+"}, '
                          '"text": {"format": {"type": "json_schema", "name": "e", "schema": {"enum": ["é"]}}}}'.encode(), JSON),
    ("grammar-non-ascii-chat", '{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, '
                               '"response_format": {"type": "json_schema", "json_schema": {"name": "e", '
                               '"schema": {"enum": ["é"]}}}}'.encode(), JSON),
    ("text-plain", b"hello", "text/plain"),
    ("form", b"a=1&b=2", "application/x-www-form-urlencoded"),
    ("too-large", b'{"prompt": "' + b"x" * (33 << 20) + b'"}', JSON),
]


@pytest.fixture(scope="module")
def operations(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    live = [(path, method.upper()) for path, ops in schema["paths"].items() for method in ops]
    wrong_method = [(path, "PATCH") for path, _ in live if not any(m == "PATCH" for p, m in live if p == path)]
    return sorted(set(live + wrong_method[:5] + [("/no/such/route", "POST"), ("/v1/no-such", "GET")]))


PATH_NAME = "no-e0"  # the `{name}` of the routes that take one: a loaded profile


def _tracebacks(server) -> int:
    return server.log.read_text(errors="replace").count("Traceback (most recent call last)")


def _put_back(server, name: str, data: bytes) -> None:
    """The corpus's DELETE on `/v1/steering/profiles/{name}` with the admin key really deletes `name`:
    upload it again, for the tests that share this server after this one."""
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120) as http:
        if http.get(f"/v1/steering/profiles/{name}").status_code == 404:
            resp = http.post("/v1/steering/profiles", content=data, headers={"content-type": "application/octet-stream"})
            assert resp.status_code == 201, resp.text


def test_bad_input_corpus_on_every_route(server, operations, report):
    failures, responses, before = [], 0, _tracebacks(server)
    kept = (server.steering_dir / f"{PATH_NAME}.safetensors").read_bytes()
    for key in (API_KEY, BOUND_KEY, ADMIN_KEY):
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as http:
            for (path, method), (name, body, content_type) in ((op, b) for op in operations for b in BODIES):
                if key != API_KEY and name not in ("steering-list", "xargs-reserved", "deep-array", "not-utf8"):
                    continue  # the bound and admin keys run the steering cases only
                url = path.replace("{response_id}", "resp_x").replace("{name}", PATH_NAME)
                resp = http.request(method, url, content=body, headers={"content-type": content_type})
                responses += 1
                problem = _check(resp)
                if problem:
                    failures.append((key, method, path, name, resp.status_code, problem, resp.text[:160]))
                # the same connection answers the next request
                if http.get("/health").status_code != 200:
                    failures.append((key, method, path, name, "connection unusable afterwards"))
    new_tracebacks = _tracebacks(server) - before
    _put_back(server, PATH_NAME, kept)
    report(responses=responses, failures=len(failures), new_tracebacks=new_tracebacks)
    assert failures == [], failures[:10]
    assert new_tracebacks == 0


def _check(resp: httpx.Response) -> str | None:
    if resp.status_code >= 500:
        return "5xx"
    if resp.headers.get("connection", "").lower() == "close":
        return "connection closed"
    if resp.status_code >= 400:
        try:
            error = resp.json().get("error")
        except (ValueError, AttributeError):
            return "not JSON"
        if not isinstance(error, dict) or not error.get("message"):
            return "not the envelope"
    return None


def test_schema_fuzzing_over_the_whole_live_schema(server, full, report):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    generation = {"/v1/completions", "/v1/chat/completions", "/v1/chat/completions/batch", "/v1/responses",
                  "/v1/messages", "/invocations", "/generative_scoring"}
    failures, cases = [], 0
    for result in schema.get_all_operations():
        operation = result.ok()
        examples = (1000 if operation.path in generation else 100) if full else 6

        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(operation.as_strategy())
        def check(case):
            nonlocal cases
            cases += 1
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {API_KEY}"}
            _keep_generation_short(case.body)
            try:
                resp = case.call(base_url=server.url, timeout=120)
            except requests.RequestException as exc:  # e.g. a stream cut after its headers
                failures.append((operation.method.upper(), operation.path, "no response", type(exc).__name__,
                                 json.dumps(case.body, default=str)[:200]))
                return
            problem = _check(resp)
            if problem:
                failures.append((operation.method.upper(), operation.path, resp.status_code, problem, resp.text[:200]))

        check()
    report(cases=cases, failures=len(failures))
    assert failures == [], failures[:10]


def _keep_generation_short(body) -> None:
    """Small outputs: the point is the request handling, not long generations on 2 cores."""
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if not isinstance(body.get(key), int) or body[key] > 4:
            body[key] = 2
    for key in ("n", "best_of"):
        if isinstance(body.get(key), int) and body[key] > 2:
            body[key] = 2
    body.pop("stream", None) if body.get("stream") not in (None, False, True) else None
    json.dumps(body)  # must stay serialisable
