"""ASGI middleware in front of vLLM's OpenAI routes: API keys and per-request steering.

vLLM's request models silently drop unknown top-level fields, and steering sent
through `vllm_xargs` would reach the engine unvalidated and without a cache salt.
So, before vLLM parses a completion or chat request, this layer:
  1. checks the API key (401) and the key's mandatory profile (403 on override);
  2. resolves the profile from the top-level `steering` field or `vllm_xargs.steering`
     (400 for an unknown profile, listing the available ones);
  3. rewrites the body: `vllm_xargs` carries the profile's name, engine slot and
     content hash (what the worker reads), and `cache_salt` gets the content hash
     mixed in, so requests with different profiles never share KV blocks;
  4. pins the profile's slot until the response has been fully sent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field

from .errors import APIError, send_openai_error
from .profile_store import ProfileStore

STEERED_PATHS = ("/v1/completions", "/v1/chat/completions")
OPEN_PATHS = ("/health", "/ready", "/metrics", "/ping", "/version", "/openapi.json", "/docs", "/redoc")
XARG_NAME, XARG_SLOT, XARG_HASH = "unipool_steering", "unipool_steering_slot", "unipool_steering_hash"
MAX_BODY_BYTES = 32 << 20


@dataclass
class AccessPolicy:
    """API keys (each optionally bound to a mandatory profile) and the admin key."""

    keys: dict[str, str | None] = field(default_factory=dict)
    admin_key: str | None = None

    @classmethod
    def parse(cls, key_specs: list[str], admin_key: str | None) -> AccessPolicy:
        keys: dict[str, str | None] = {}
        for spec in key_specs:
            key, _, profile = spec.partition("=")
            if not key:
                raise ValueError(f"--api-key {spec!r}: empty key")
            keys[key] = profile or None
        return cls(keys, admin_key or None)

    def identify(self, headers: dict[bytes, bytes]) -> tuple[str | None, bool]:
        """(bound profile, is_admin) for the request's bearer token; APIError(401) when keys are required."""
        auth = headers.get(b"authorization", b"").decode("latin-1")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        is_admin = bool(self.admin_key and token and hmac.compare_digest(token, self.admin_key))
        if not self.keys or is_admin:
            return None, is_admin
        for key, profile in self.keys.items():
            if token and hmac.compare_digest(token, key):
                return profile, False
        raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                       code="invalid_api_key")


def cache_salt_for(profile_hash: str, user_salt: str | None) -> str:
    """A salt within vLLM's limits (<= 128 chars, no '@', '/', '\\') unique to (user salt, profile)."""
    digest = hashlib.sha256(f"{user_salt or ''}\0{profile_hash}".encode()).hexdigest()
    return f"unipool-{digest[:48]}"


class SteeringGateway:
    """Pure ASGI middleware (streaming responses pass through untouched)."""

    def __init__(self, app, store_getter, policy: AccessPolicy, on_request=None, on_steering_error=None):
        self.app = app
        self.store_getter = store_getter  # () -> ProfileStore | None (None until the engine is up)
        self.policy = policy
        self.on_request = on_request  # (profile name or None) -> None: metrics hook
        self.on_steering_error = on_steering_error  # (reason) -> None: metrics hook

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].startswith(OPEN_PATHS):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        try:
            bound, is_admin = self.policy.identify(headers)
            scope.setdefault("state", {})["unipool_admin"] = is_admin
            scope["state"]["unipool_bound_profile"] = bound
            if scope["method"] != "POST" or scope["path"] not in STEERED_PATHS:
                return await self.app(scope, receive, send)
            body = await _read_body(receive)
            body, active = self._rewrite(body, bound)
            # the body may have changed size: keep the header truthful for whatever reads it
            scope["headers"] = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-length"]
            scope["headers"].append((b"content-length", str(len(body)).encode()))
        except APIError as err:
            if err.param == "steering" and self.on_steering_error is not None:
                self.on_steering_error(str(err.code))
            return await send_openai_error(send, err.status, err.message, param=err.param, code=err.code)

        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then wait for disconnect, as the app expects

        if self.on_request is not None:
            self.on_request(active.profile.name if active else None)
        try:
            await self.app(scope, replay, send)
        finally:
            if active is not None:
                await self.store_getter().release(active)

    def _rewrite(self, body: bytes, bound: str | None):
        try:
            request = json.loads(body) if body else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return body, None  # vLLM answers malformed JSON with its own 400
        if not isinstance(request, dict):
            return body, None
        xargs = request.get("vllm_xargs")
        if xargs is not None and not isinstance(xargs, dict):
            return body, None  # vLLM's validation rejects it
        xargs = dict(xargs or {})
        reserved = sorted(k for k in xargs if k.startswith("unipool_"))
        if reserved:
            raise APIError(400, f"vllm_xargs keys {reserved} are reserved for the server", param="vllm_xargs")
        asked = {v for v in (request.pop("steering", None), xargs.pop("steering", None)) if v is not None}
        if any(not isinstance(v, str) for v in asked):
            raise APIError(400, "'steering' must be a profile name (string)", param="steering",
                           code="invalid_steering_field")
        if len(asked) > 1:
            raise APIError(400, f"conflicting steering profiles {sorted(asked)} in 'steering' and 'vllm_xargs'",
                           param="steering", code="conflicting_steering")
        name = next(iter(asked), None)
        if bound is not None:
            if name is not None and name != bound:
                raise APIError(403, f"this API key is bound to steering profile {bound!r}; it cannot be overridden",
                               param="steering", code="steering_override_forbidden")
            name = bound
        active = None
        if name is not None:
            store = self.store_getter()
            if store is None:
                raise APIError(503, "the engine is still loading", code="not_ready")
            active = store.acquire(name)
            xargs.update({XARG_NAME: name, XARG_SLOT: active.slot, XARG_HASH: active.content_hash[:16]})
            request["cache_salt"] = cache_salt_for(active.content_hash, request.get("cache_salt"))
        if xargs:
            request["vllm_xargs"] = xargs
        else:
            request.pop("vllm_xargs", None)
        return json.dumps(request).encode(), active


async def _read_body(receive) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise APIError(400, "client disconnected before sending the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
