"""What this server keeps beside vLLM's app, named once.

On the FastAPI app (`app.state.unipool`, a `ServerState`): the access policy and the server
settings (set when the routes are attached), why new requests cannot be served now, and the
profile store (set last, once the engine is ready: /ready turns 200 from then on). On each
request's ASGI scope (`scope["state"]`): whether the caller proved the admin key, which the
gateway decides and the routes read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: this module is imported by the modules it names
    from vllm.engine.protocol import EngineClient

    from unipool_serve.model_executor.settings import ServerSettings

    from .policy import AccessPolicy
    from .profile_store import ProbeStore, ProfileStore

APP_STATE = "unipool"  # attribute of app.state
IS_ADMIN = "unipool_admin"  # key of scope["state"]
BOUND_PROFILE = "unipool_bound_profile"  # key of scope["state"]


@dataclass
class ServerState:
    policy: AccessPolicy
    settings: ServerSettings
    unavailable: Callable[[], str | None]  # why new requests cannot be served now (None: they can)
    store: ProfileStore | None = None  # once the engine is ready
    probes: ProbeStore | None = None  # once the engine is ready
    engine_client: EngineClient | None = None  # vLLM's AsyncLLM, once the engine is ready


def server_state(app) -> ServerState:
    return getattr(app.state, APP_STATE)


def attach_state(app, state: ServerState) -> None:
    setattr(app.state, APP_STATE, state)


def mark_admin(scope, is_admin: bool) -> None:
    scope.setdefault("state", {})[IS_ADMIN] = is_admin


def is_admin(scope) -> bool:
    return bool(scope.get("state", {}).get(IS_ADMIN))


def mark_bound(scope, profile: str | None) -> None:
    """The steering profile the caller's key is bound to (None: not bound)."""
    scope.setdefault("state", {})[BOUND_PROFILE] = profile


def bound_profile(scope) -> str | None:
    return scope.get("state", {}).get(BOUND_PROFILE)
