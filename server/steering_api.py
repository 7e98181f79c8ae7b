"""HTTP routes that are ours: steering profiles, routing probes and readiness.

Any accepted key lists the profiles and probes by name and description; their content
(digest, per-layer rows, a probe's threshold and measured rates) is shown to the admin key
only, unless UNIPOOL_PUBLIC_PROFILE_DETAILS=1. Uploads and deletions need the admin key.
"""

from __future__ import annotations

import functools

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from unipool_serve.model_executor.steering import contract
from unipool_serve.model_executor.steering.probe import ProbeError, RoutingProbe
from unipool_serve.model_executor.steering.profile import SteeringProfile, SteeringProfileError, check_name

from .app_state import is_admin, server_state
from .errors import APIError, openai_error
from .profile_store import ProfileExists, ProfileStoreError, SlotsFull, UnknownProfile

MAX_PROFILE_BYTES = 8 << 20
router = APIRouter()
STORE_ERROR_STATUS = {UnknownProfile: 404, ProfileExists: 409, SlotsFull: 409}


def _store(request: Request, kind: str = "store"):
    store = getattr(server_state(request.app), kind)
    if store is None:
        raise APIError(503, "steering profiles and probes are still loading", code="not_ready")
    return store


def _is_admin(request: Request) -> bool:
    return is_admin(request.scope)


def _require_admin(request: Request) -> None:
    if not server_state(request.app).policy.admin_key:
        raise APIError(403, "profile changes are disabled: the server was started without --admin-key",
                       code="admin_disabled")
    if not _is_admin(request):
        raise APIError(403, "this operation needs the admin key", code="admin_required")


def _shows_details(request: Request) -> bool:
    return _is_admin(request) or server_state(request.app).settings.public_profile_details


def _api(handler):
    """Turn APIError, store errors and profile errors into the OpenAI envelope."""
    @functools.wraps(handler)
    async def wrapper(*args, **kwargs):
        try:
            return await handler(*args, **kwargs)
        except APIError as err:
            return openai_error(err.status, err.message, param=err.param, code=err.code)
        except ProfileStoreError as err:
            return openai_error(STORE_ERROR_STATUS.get(type(err), 400), str(err), code=err.code)
        except ProbeError as err:
            return openai_error(400, str(err), code="invalid_probe")
        except SteeringProfileError as err:
            return openai_error(400, str(err), code="invalid_steering_profile")
    return wrapper


@router.get("/ready")
async def ready(request: Request):
    ours = server_state(request.app)
    store, engine = ours.store, ours.engine_client
    if (reason := ours.unavailable()) is not None:
        return openai_error(503, f"not ready: {reason}", code="unavailable")
    if store is None or engine is None or engine.errored:
        return openai_error(503, "not ready: model or steering profiles still loading", code="not_ready")
    return JSONResponse({"status": "ready", "steering_profiles": store.names(), "profile_load_errors": store.load_errors})


@router.get("/v1/steering/profiles")
@_api
async def list_profiles(request: Request):
    store, details = _store(request), _shows_details(request)
    data = []
    for name, active in sorted(store.by_name.items()):
        entry = {"object": "steering_profile", "id": name, "description": active.item.description}
        if details:
            entry |= {"alpha": active.item.alpha, "content_hash": contract.digest(active.content_hash)}
        data.append(entry)
    return JSONResponse({"object": "list", "data": data})


@router.get("/v1/steering/profiles/{name}")
@_api
async def get_profile(name: str, request: Request):
    check_name(name)
    profile = _store(request).get(name).item
    if not _shows_details(request):
        return JSONResponse({"object": "steering_profile", "name": profile.name, "description": profile.description})
    return JSONResponse({"object": "steering_profile", **profile.summary()})


@router.post("/v1/steering/profiles", status_code=201)
@_api
async def upload_profile(request: Request, replace: bool = False):
    """Body: the raw profile file (safetensors, see docs/steering.md), at most 8 MiB."""
    _require_admin(request)
    store = _store(request)
    profile = SteeringProfile.from_bytes(await read_upload(request), store.config, source="uploaded profile")
    active = await store.add(profile, replace=replace)
    return JSONResponse({"object": "steering_profile", **active.item.summary()}, status_code=201)


async def read_upload(request: Request, limit: int = MAX_PROFILE_BYTES) -> bytes:
    """The raw file of an upload; 413 past `limit` bytes (declared or sent)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"file larger than {limit} bytes", code="body_too_large")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise APIError(413, f"file larger than {limit} bytes", code="body_too_large")
    return bytes(data)


@router.delete("/v1/steering/profiles/{name}")
@_api
async def delete_profile(name: str, request: Request):
    _require_admin(request)
    check_name(name)
    running = await _store(request).remove(name)
    return JSONResponse({"object": "steering_profile.deleted", "id": name, "deleted": True,
                         "running_requests": running})


# ---- routing probes (docs/probes.md) -------------------------------------------------------


@router.get("/v1/steering/probes")
@_api
async def list_probes(request: Request):
    store, details = _store(request, "probes"), _shows_details(request)
    data = []
    for name, loaded in sorted(store.by_name.items()):
        entry = {"object": "routing_probe", "id": name, "description": loaded.item.description,
                 "labels": loaded.item.labels}
        if details:
            entry |= {"threshold": loaded.item.threshold, "content_hash": contract.digest(loaded.content_hash)}
        data.append(entry)
    return JSONResponse({"object": "list", "data": data})


@router.get("/v1/steering/probes/{name}")
@_api
async def get_probe(name: str, request: Request):
    check_name(name)
    probe = _store(request, "probes").get(name).item
    if not _shows_details(request):
        return JSONResponse({"object": "routing_probe", "name": probe.name, "description": probe.description,
                             "labels": probe.labels})
    return JSONResponse({"object": "routing_probe", **probe.summary()})


@router.post("/v1/steering/probes", status_code=201)
@_api
async def upload_probe(request: Request, replace: bool = False):
    """Body: the raw probe file (safetensors, see docs/probes.md), at most 8 MiB."""
    _require_admin(request)
    store = _store(request, "probes")
    if store.unavailable is not None:
        raise APIError(400, f"this server runs no probes: {store.unavailable}", code="probes_unsupported")
    probe = RoutingProbe.from_bytes(await read_upload(request), store.config, source="uploaded probe")
    loaded = await store.add(probe, replace=replace)
    return JSONResponse({"object": "routing_probe", **loaded.item.summary()}, status_code=201)


@router.delete("/v1/steering/probes/{name}")
@_api
async def delete_probe(name: str, request: Request):
    _require_admin(request)
    check_name(name)
    running = await _store(request, "probes").remove(name)
    return JSONResponse({"object": "routing_probe.deleted", "id": name, "deleted": True, "running_requests": running})
