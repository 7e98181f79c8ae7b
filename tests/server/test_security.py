"""A key bound to a profile cannot escape it on any route of the live app, and nobody can poison
another user's prefix cache.

The server (server_process.py's, shared with test_server.py) runs with every flag-gated route
vLLM 0.32 has on (dev mode, scale-out, the Cohere API) and with prefix caching on (32-token
blocks). The route list is read from the live app at test time, so a vLLM upgrade that adds a
route is tried like the others. The bound key's profile (`only-e5`) routes every token of every
layer to expert 5, so a request that reached the engine unsteered, or under another profile,
shows in the routing counts whatever the model's weights are.
"""

from __future__ import annotations

import itertools
import socket
from urllib.parse import urlparse

import httpx
import pytest

from unipool_serve.server.policy import Access, route_access

from server_process import ADMIN_KEY, API_KEY, BOUND_KEY, MAIN_SERVER

pytestmark = pytest.mark.server
SHARED_SERVERS = (MAIN_SERVER,)
MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "def add(a, b):"}]
# A body that makes each generation route run the model (3 new tokens).
GENERATION_BODIES = {
    "/v1/completions": {"model": MODEL, "prompt": "def add(a, b):", "max_tokens": 3, "ignore_eos": True},
    "/v1/chat/completions": {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "ignore_eos": True},
    "/v1/chat/completions/batch": {"model": MODEL, "messages": [MESSAGES, MESSAGES], "max_tokens": 3},
    "/v1/responses": {"model": MODEL, "input": "def add(a, b):", "max_output_tokens": 3},
    "/v1/messages": {"model": MODEL, "messages": MESSAGES, "max_tokens": 3},
    "/invocations": {"model": MODEL, "prompt": "def add(a, b):", "max_tokens": 3, "ignore_eos": True},
    "/generative_scoring": {"model": MODEL, "query": "def add(a, b):", "items": [" x", " y"], "label_token_ids": [5, 6]},
    "/cohere/v2/chat": {"model": MODEL, "messages": MESSAGES, "max_tokens": 3},
}
# User routes that never start an engine request (tokenization, rendering, listings).
NO_ENGINE_ROUTES = {"/tokenize", "/detokenize", "/v1/messages/count_tokens", "/v1/completions/render",
                    "/v1/chat/completions/render", "/v1/messages/render", "/v1/responses/render",
                    "/v1/completions/derender", "/v1/chat/completions/derender", "/cohere/v2/chat/render",
                    "/v1/steering/profiles", "/v1/steering/probes", "/v1/responses/{response_id}/cancel"}
ESCAPES = {
    "plain": {},
    "steering-field": {"steering": "no-e1"},
    "steering-xargs": {"vllm_xargs": {"steering": "no-e1"}},
    "forged-row": {"vllm_xargs": {"unipool_steering": "no-e1", "unipool_steering_slot": 1,
                                  "unipool_steering_digest": "0" * 16, "unipool_steering_sig": "0" * 64}},
    "stream": {"stream": True},
    "n2": {"n": 2, "temperature": 1.0},
    "beam-search": {"use_beam_search": True, "n": 2},
}


@pytest.fixture(scope="module")
def operations(server):
    """(path, method) of every operation of the live app that takes a body."""
    schema = httpx.get(f"{server.url}/openapi.json").json()
    return sorted((path, method.upper()) for path, ops in schema["paths"].items() for method, op in ops.items()
                  if method in ("post", "put", "patch"))


def _call(server, key, path, method, body):
    def send():
        with server.http(key) as http:
            return http.request(method, path.replace("{response_id}", "resp_x").replace("{name}", "x"), json=body)
    return server.routing_of(send)


def test_the_flag_gated_routes_are_live(operations):
    paths = {path for path, _ in operations}
    for path in ("/inference/v1/generate", "/cohere/v2/chat", "/collective_rpc", "/reset_prefix_cache"):
        assert path in paths, f"{path} not mounted: the escape tests would not try it"


def test_every_user_route_is_known_to_these_tests(operations):
    # A user route that starts engine requests needs a body here, or the escapes would not reach it.
    unknown = [p for p, _ in operations
               if route_access(p) is Access.USER and p not in GENERATION_BODIES and p not in NO_ENGINE_ROUTES]
    assert unknown == [], f"add a body to GENERATION_BODIES (or the route to NO_ENGINE_ROUTES): {unknown}"


def test_no_route_lets_a_bound_key_escape(server, operations):
    ran, escaped, errors = set(), [], []
    for (path, method), (name, trick) in itertools.product(operations, ESCAPES.items()):
        body = {**GENERATION_BODIES.get(path, GENERATION_BODIES["/v1/completions"]), **trick}
        resp, routing = _call(server, BOUND_KEY, path, method, body)
        computed = sum(routing.values())
        if resp.status_code >= 500:
            errors.append((path, name, resp.status_code, resp.text[:200]))
        if computed and routing.get(5, 0) != computed:
            escaped.append((path, name, resp.status_code, routing))
        if computed and resp.status_code < 300:
            ran.add(path)
        if route_access(path) is Access.ADMIN:
            assert resp.status_code == 403 and not computed, (path, name)
    assert escaped == [], escaped
    assert errors == [], errors
    # the escapes really reached the engine on every generation route of the app
    assert {p for p, _ in operations if p in GENERATION_BODIES} - {"/generative_scoring"} <= ran


def _poison_then_check(server, path, prompt_text):
    """The bound key fills the prefix cache for a prompt via `path`; then an unbound user's request for
    the same prompt must equal the same request computed from an empty cache."""
    body = dict(GENERATION_BODIES[path])
    if "prompt" in body:
        body["prompt"] = prompt_text
    else:
        body["messages"] = [{"role": "user", "content": prompt_text}]
    victim_body = {**body, "temperature": 0, "max_tokens": 6}
    admin = server.http(ADMIN_KEY)
    assert admin.post("/reset_prefix_cache").status_code == 200
    attack = server.http(BOUND_KEY).post(path, json=body)
    assert attack.status_code == 200, attack.text
    after_attack = server.http(API_KEY).post(path, json=victim_body)
    assert admin.post("/reset_prefix_cache").status_code == 200
    fresh = server.http(API_KEY).post(path, json=victim_body)
    assert after_attack.status_code == fresh.status_code == 200
    assert after_attack.json()["choices"] == fresh.json()["choices"], f"{path}: the victim read the attacker's KV"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/invocations"])
def test_a_steered_request_cannot_poison_the_prefix_cache(server, path):
    long_prompt = " ".join(f"w{i}" for i in range(70)) + f" {path}"  # several 32-token blocks, fresh per route
    _poison_then_check(server, path, long_prompt)


def _websocket_handshake(url: str, path: str, key: str | None) -> int:
    parsed = urlparse(url)
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    request = (f"GET {path} HTTP/1.1\r\nHost: {parsed.hostname}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n")
    with socket.create_connection((parsed.hostname, parsed.port), timeout=120) as sock:
        sock.sendall(request.encode())
        status_line = sock.recv(4096).split(b"\r\n", 1)[0].decode()
    return int(status_line.split()[1])


def test_websocket_upgrades_are_refused(server, operations):
    for path in sorted({p for p, _ in operations} | {"/v1/realtime"}):
        for key in (None, BOUND_KEY):
            assert _websocket_handshake(server.url, path, key) != 101, (path, key)


def test_profile_content_is_the_admins_to_see(server):
    for key in (API_KEY, BOUND_KEY):
        listed = server.http(key).get("/v1/steering/profiles").json()["data"]
        assert listed and all(set(p) == {"object", "id", "description"} for p in listed)
    assert "content_hash" in server.http(ADMIN_KEY).get("/v1/steering/profiles").json()["data"][0]
