"""HTTP routes that are ours: steering profiles, routing probes and readiness.

Any accepted key lists the profiles and probes by name and description; their content
(digest, per-layer rows, a probe's threshold and measured rates) is shown to the admin key
only, unless UNIPOOL_PUBLIC_PROFILE_DETAILS=1 (`?rows=true` adds a profile's full tables for
those callers: the bias [L][E] with alpha folded in and the include/exclude mask). A key bound to
a profile sees that profile only: the listing names it alone and any other name is answered
as an unknown one (404). Uploads and deletions need the admin key.
"""

from __future__ import annotations

import functools

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from unipool_serve.model_executor.steering import contract
from unipool_serve.model_executor.steering.probe import ProbeError, RoutingProbe
from unipool_serve.model_executor.steering.profile import SteeringProfile, SteeringProfileError, check_name
from unipool_serve.model_executor.steering.shape import SteerableModel

from .app_state import bound_profile, is_admin, server_state
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
    model = SteerableModel.of(store.config)  # what a profile made elsewhere must be made for (unipool-steering fit)
    return JSONResponse({"status": "ready", "steering_profiles": store.names(), "profile_load_errors": store.load_errors,
                         "model": {"architecture": model.architecture, "fingerprint": model.fingerprint}})


@router.get("/v1/steering/profiles")
@_api
async def list_profiles(request: Request):
    store, details = _store(request), _shows_details(request)
    data = []
    for name in _visible_profiles(request, store):
        active = store.by_name[name]
        entry = {"object": "steering_profile", "id": name, "description": active.item.description}
        if details:
            entry |= {"alpha": active.item.alpha, "content_hash": contract.digest(active.content_hash)}
        data.append(entry)
    model = SteerableModel.of(store.config)
    # the caller's own binding (its requests run under that profile whatever they name), and the shape
    # every profile and every routing capture of this model has
    return JSONResponse({"object": "list", "data": data, "bound_profile": bound_profile(request.scope),
                         "model": {"num_layers": model.num_layers, "num_experts": model.num_experts,
                                   "top_k": model.top_k}})


@router.get("/v1/steering/profiles/{name}")
@_api
async def get_profile(name: str, request: Request, rows: bool = False):
    """`?rows=true`: also the profile's tables as the engine applies them, `rows.bias` [L][E] (alpha
    folded in) and `rows.mask` [L][E] (1 include, -1 exclude, 0 neither), for callers who may see
    profile content (403 for the others)."""
    check_name(name)
    store = _store(request)
    profile = _visible_profile(request, store, name).item
    if not _shows_details(request):
        if rows:
            raise APIError(403, "a profile's tables are shown to the admin key only (the server can show them to "
                           "every key with --public-profile-details)", param="rows", code="profile_details_hidden")
        return JSONResponse({"object": "steering_profile", "name": profile.name, "description": profile.description})
    body = {"object": "steering_profile", **profile.summary()}
    if rows:
        body["rows"] = {"bias": profile.bias_rows().tolist(), "mask": profile.mask_rows().tolist()}
    return JSONResponse(body)


def _visible_profiles(request: Request, store) -> list[str]:
    """The profile names this caller may see: all of them, or its bound profile alone."""
    bound = bound_profile(request.scope)
    return [name for name in store.names() if bound is None or name == bound]


def _visible_profile(request: Request, store, name: str):
    """The loaded profile `name`; for a bound key any other name is unknown (the same 404, naming only
    what the caller may see)."""
    visible = _visible_profiles(request, store)
    if name not in visible:
        error = UnknownProfile(f"unknown {store.what} {name!r}; available {store.plural}: {visible}")
        error.code = store.codes["unknown"]
        raise error
    return store.by_name[name]


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
