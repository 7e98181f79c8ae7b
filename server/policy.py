"""Who may call what: API keys, their bound profiles, the admin key, and the class of every route.

Every route of the live app falls in one class, looked up by its path template:
  open   no key needed (probes, metrics, API docs, the steering console's page and assets);
  user   any accepted key (or anyone, when no key is configured): generation, tokenization,
         models, listing steering profiles;
  admin  the admin key only; a route this table does not name is admin-only (deny by
         default: a route a vLLM upgrade adds is not open to users until it is reviewed
         here). Without --admin-key these routes are refused to everyone.
Whatever its class, a request that reaches the engine is steered by the one enforcement
point (server/enforcement.py); this table decides who may call a route at all.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from enum import Enum

from .errors import APIError


class Access(Enum):
    OPEN = "open"
    USER = "user"
    ADMIN = "admin"


ROUTE_ACCESS: dict[str, Access] = {
    **dict.fromkeys([
        "/health", "/ready", "/ping", "/metrics", "/load", "/version",
        "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc",
        # the steering console's page and assets: they hold no data (what the page shows comes from
        # API calls that carry the user's key)
        "/console", "/console/static/{asset}",
    ], Access.OPEN),
    **dict.fromkeys([
        # generation (each steered at the enforcement point)
        "/v1/completions", "/v1/chat/completions", "/v1/chat/completions/batch", "/v1/responses",
        "/v1/messages", "/invocations", "/generative_scoring", "/cohere/v2/chat", "/v1/systemone",
        # reading back or cancelling one's own background response (ids are unguessable)
        "/v1/responses/{response_id}", "/v1/responses/{response_id}/cancel",
        # no engine request: tokenization and rendering
        "/tokenize", "/detokenize", "/v1/messages/count_tokens",
        "/v1/completions/render", "/v1/chat/completions/render", "/v1/messages/render",
        "/v1/responses/render", "/v1/completions/derender", "/v1/chat/completions/derender",
        "/cohere/v2/chat/render",
        "/v1/models", "/kv_event_sources",
        # ours: listing is open to users, changes check the admin key in the handler
        "/v1/steering/profiles", "/v1/steering/profiles/{name}",
        "/v1/steering/probes", "/v1/steering/probes/{name}",
    ], Access.USER),
}


def route_access(path_template: str) -> Access:
    return ROUTE_ACCESS.get(path_template, Access.ADMIN)


@dataclass(frozen=True)
class Binding:
    """What a key's requests always run under: `KEY=[PROFILE][@GATE][+PROBE...]` on the command line.

    `safe` binds profile safe; `safe@risky` binds it gated: it applies once probe `risky` fires on
    the prompt; `+audit` (repeatable) makes probe audit score every request of the key."""

    profile: str | None = None
    gate: str | None = None
    probes: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Binding:
        head, *probes = text.split("+")
        profile, at, gate = head.partition("@")
        if at and not (profile and gate):
            raise ValueError(f"binding {text!r}: PROFILE@PROBE needs both names")
        if any(not p for p in probes):
            raise ValueError(f"binding {text!r}: an empty probe name after '+'")
        return cls(profile or None, gate or None, tuple(probes))

    def probe_names(self) -> set[str]:
        return set(self.probes) | ({self.gate} if self.gate else set())


@dataclass(frozen=True)
class Caller:
    """The identity a request's bearer token proves."""

    binding: Binding = Binding()  # what the key's requests always run under
    is_admin: bool = False

    @property
    def bound(self) -> str | None:
        """The key's mandatory steering profile."""
        return self.binding.profile


@dataclass
class AccessPolicy:
    """API keys (each optionally bound to a mandatory profile, gate and probes) and the admin key."""

    keys: dict[str, Binding] = field(default_factory=dict)
    admin_key: str | None = None

    @classmethod
    def parse(cls, key_specs: list[str], admin_key: str | None) -> AccessPolicy:
        """From `KEY` / `KEY=BINDING` specs (Binding); ValueError names what is inconsistent."""
        keys: dict[str, Binding] = {}
        for spec in key_specs:
            key, _, binding = spec.partition("=")
            if not key.strip() or key != key.strip():
                raise ValueError(f"--api-key {spec!r}: the key is empty or has surrounding spaces")
            if key in keys:
                raise ValueError(f"--api-key {key!r} is given twice")
            try:
                keys[key] = Binding.parse(binding)
            except ValueError as exc:
                raise ValueError(f"--api-key {key}=...: {exc}") from None
        if admin_key and admin_key != admin_key.strip():
            raise ValueError("--admin-key has surrounding spaces")
        if admin_key and admin_key in keys:
            raise ValueError("--admin-key equals one of the --api-key keys: use a separate admin key")
        return cls(keys, admin_key or None)

    def bound_profiles(self) -> set[str]:
        return {b.profile for b in self.keys.values() if b.profile is not None}

    def bound_probes(self) -> set[str]:
        return {name for b in self.keys.values() for name in b.probe_names()}

    def identify(self, headers: dict[bytes, bytes]) -> Caller:
        """The caller behind the bearer token; APIError(401) when keys are required and it is none of them."""
        auth = headers.get(b"authorization", b"").decode("latin-1")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        raw = token.encode("latin-1") if token else b""  # the header's own bytes
        if self.admin_key and raw and hmac.compare_digest(raw, self.admin_key.encode()):
            return Caller(is_admin=True)
        if not self.keys:
            return Caller()
        for key, binding in self.keys.items():
            if raw and hmac.compare_digest(raw, key.encode()):
                return Caller(binding=binding)
        raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")

    def check(self, access: Access, caller: Caller) -> None:
        """APIError(403) unless `caller` may use a route of class `access`."""
        if access is Access.ADMIN and not caller.is_admin:
            if not self.admin_key:
                raise APIError(403, "this route needs the admin key, and the server was started without "
                               "--admin-key", code="admin_disabled")
            raise APIError(403, "this route needs the admin key", code="admin_required")
