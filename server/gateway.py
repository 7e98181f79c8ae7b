"""ASGI middleware in front of every route of vLLM's app: keys, route access, request context.

For each HTTP or WebSocket request it
  0. answers 503 (with Retry-After) while the server cannot serve (draining for shutdown,
     engine dead), and makes every error response, whoever produced it, leave in the OpenAI
     envelope;
  1. finds the route the request is for and its access class (server/policy.py), checks the
     bearer key (401) and the class (403);
  2. for a body that is JSON, takes our fields out of it (server/request_fields.py: steering,
     its probe gate, the expert budget, routing capture, probes; vLLM would drop them
     silently or pass them on unchecked); rejects bad ones, reserved `vllm_xargs` keys,
     conflicting names and a bound key's override (403) with the OpenAI envelope before any
     route runs; mends what vLLM's own routes break on (server/request_repairs.py);
  3. sets the request context (enforcement.CURRENT_REQUEST) that the enforcement point
     reads for every engine request this HTTP request leads to.
It decides nothing about steering itself: the enforcement point does, for every route.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace

from starlette.routing import Match

from unipool_serve.model_executor.steering import contract

from .app_state import mark_admin, mark_bound
from .capture import CaptureResponse, ProbeScoreFn, TakeFn
from .enforcement import CURRENT_REQUEST, RequestContext, SteeringRefused, resolve_gate, resolve_profile
from .errors import APIError, envelope_errors, send_openai_error
from .policy import Access, AccessPolicy, route_access
from .request_fields import take_fields
from .request_repairs import repair

MAX_BODY_BYTES = 32 << 20
BODY_METHODS = ("POST", "PUT", "PATCH")
RAW_BODY_ROUTES = {("POST", "/v1/steering/profiles"), ("POST", "/v1/steering/probes")}  # binary uploads: never JSON
METRICS_ROUTE = "/metrics"
RETRY_AFTER_S = 5


class APIGateway:
    """Pure ASGI middleware (streaming responses pass through untouched)."""

    def __init__(self, app, router, policy: AccessPolicy,
                 on_steering_error: Callable[[str], None] | None = None,
                 on_metrics_scrape: Callable[[], Awaitable[None]] | None = None,
                 unavailable: Callable[[], str | None] = lambda: None,
                 take_capture: TakeFn | None = None, body_timeout: float = 60.0,
                 on_probe_scores: ProbeScoreFn | None = None):
        self.app = app
        self.router = router  # the FastAPI app's router: what each path is
        self.policy = policy
        self.unavailable = unavailable  # why the server cannot take requests now (None: it can)
        self.take_capture = take_capture  # engine ids -> captured routing (server/capture.py)
        self.on_steering_error = on_steering_error  # (reason) -> None: metrics hook
        self.on_metrics_scrape = on_metrics_scrape  # refreshes routing counts before a scrape
        self.body_timeout = body_timeout  # seconds a request has to send its whole body
        self.on_probe_scores = on_probe_scores  # (probe name, one request's scores) -> None: metrics hook

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if scope["type"] == "http":
            send = envelope_errors(send)
        template = self.route_template(scope)
        if template is None:  # no such path: the app answers 404 (or 405)
            return await self.app(scope, receive, send)
        access = route_access(template)
        if access is Access.OPEN:
            if template == METRICS_ROUTE and self.on_metrics_scrape is not None:
                await self.on_metrics_scrape()
            return await self.app(scope, receive, send)
        try:
            if (reason := self.unavailable()) is not None:
                raise APIError(503, reason, code="unavailable")
            caller = self.policy.identify(dict(scope.get("headers") or []))
            self.policy.check(access, caller)
            mark_admin(scope, caller.is_admin)
            mark_bound(scope, caller.bound)
            ctx, replay = RequestContext.of(caller), receive
            if scope["type"] == "http" and scope["method"] in BODY_METHODS:
                body = await read_body(receive, self.body_timeout)
                if (scope["method"], template) not in RAW_BODY_ROUTES:
                    body, ctx = self.take_steering(body, scope, ctx, template)
                replay = replaying(body, receive)
        except APIError as err:
            if err.param == contract.REQUEST_FIELD and self.on_steering_error is not None:
                self.on_steering_error(str(err.code))
            return await refuse(scope, send, err)
        if ctx.wants_results() and self.take_capture is not None:
            send = CaptureResponse(send, ctx, self.take_capture, self.on_probe_scores)
        token = CURRENT_REQUEST.set(ctx)
        try:
            await self.app(scope, replay, send)
        finally:
            CURRENT_REQUEST.reset(token)

    def route_template(self, scope) -> str | None:
        """The path template of the route `scope` is for (a method mismatch still names it)."""
        partial = None
        for route in self.router.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return route.path
            if match is Match.PARTIAL and partial is None:
                partial = route.path
        return partial

    def take_steering(self, body: bytes, scope, ctx: RequestContext, template: str) -> tuple[bytes, RequestContext]:
        """(body without our fields, the request context with what they asked for); APIError for
        bad input, and for a bound key's override, before any route runs."""
        if not looks_like_json(body, scope):
            return body, ctx
        request = parse_json(body)
        if not isinstance(request, dict):
            return body, ctx
        changed = repair(request, template)
        fields = take_fields(request, template)
        asked = replace(ctx, asked=fields.profile if fields.profile is not None else fields.profile_in_xargs,
                        asked_gate=fields.gate, budget=fields.budget, capture=fields.capture,
                        asked_probes=fields.probes, probe_output=fields.probe_output)
        try:
            resolve_profile(replace(ctx, asked=fields.profile), fields.profile_in_xargs)  # 400/403 before any route
            resolve_gate(asked, asked.asked)
        except SteeringRefused as refused:
            raise APIError(refused.status, str(refused), param=refused.param, code=refused.reason) from None
        if not (changed or fields.present):
            return body, ctx
        rewritten = json.dumps(request).encode()
        # the body changed size: keep the header truthful for whatever reads it
        scope["headers"] = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-length"]
        scope["headers"].append((b"content-length", str(len(rewritten)).encode()))
        return rewritten, asked


def looks_like_json(body: bytes, scope) -> bool:
    """JSON by its content type, or by its first byte whatever the type says (some routes parse
    the body themselves regardless of the header, so a field must not hide behind it)."""
    content_type = dict(scope.get("headers") or []).get(b"content-type", b"").decode("latin-1").lower()
    if "json" in content_type:
        return True
    return body.lstrip()[:1] in (b"{", b"[")


def parse_json(body: bytes):
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise APIError(400, "request body is not valid UTF-8", code="invalid_body") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply", code="invalid_body") from None
    except ValueError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None


async def read_body(receive, timeout: float = 60.0) -> bytes:
    """The whole request body (at most MAX_BODY_BYTES), within `timeout` seconds: a client that
    trickles its body (slow-loris) gets a 408 and its connection closed."""
    try:
        return await asyncio.wait_for(_read_chunks(receive), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout") from None


async def _read_chunks(receive) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise APIError(400, "client disconnected before sending the body", code="client_disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"request body larger than {MAX_BODY_BYTES} bytes", code="body_too_large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replaying(body: bytes, receive):
    """A receive() that hands the app the (rewritten) body once, then the client's own messages."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then wait for disconnect, as the app expects

    return replay


async def refuse(scope, send, err: APIError) -> None:
    if scope["type"] == "websocket":
        # before accept: the handshake is answered 403; the close code says why
        await send({"type": "websocket.close", "code": 1008, "reason": err.message[:120]})
        return
    extra = {503: [(b"retry-after", str(RETRY_AFTER_S).encode())],
             408: [(b"connection", b"close")]}.get(err.status, [])  # 408: the rest of the body is not read
    await send_openai_error(send, err.status, err.message, param=err.param, code=err.code, headers=extra)
