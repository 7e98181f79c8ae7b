"""The one steering enforcement point: every request the API process submits to the engine passes here.

vLLM's serving routes each call the engine client themselves (completions, chat, batch
chat, responses, messages, invocations, generative scoring, beam search, scale-out
generate, ...), and every one of them ends in the engine-core client's
`add_request_async(EngineCoreRequest)`, after input processing and after the n > 1
fan-out. `SteeringEnforcer.install` wraps that one method; for each engine request it
  1. decides the effective profile: the API key's bound profile (mandatory), else the one
     the request asked for (the body's `steering` field, which the gateway captured into
     the request context, or `vllm_xargs.steering`), else none; and the expert budget: the
     smallest of the request's `expert_budget.top_k` and the profile's (a
     request can lower its profile's budget, never raise it);
  2. removes every reserved `unipool_*` key a client could have placed in `extra_args` and
     writes its own, signed (model_executor/steering/contract.py);
  3. sets `cache_salt` from the profile's content, so KV blocks are shared only between
     requests under the same effective profile;
  4. pins the profile's engine row until the request has left the engine;
  5. for a request that asked for its routing (`return_routed_experts`,
     `return_router_logits`), marks it for capture (checking the logits against the byte
     limit), gives it a cache salt of its own (so every prompt token is computed and has
     routing to report) and records its engine id for server/capture.py;
  6. resolves the probes that score it (asked for, the key's, the probe gating its profile:
     the key's binding decides, steering.when otherwise), signs their engine rows, makes it
     compute its whole prompt (no prefix-cache reads: a probe scores every prompt token) and,
     for a gated profile, gives it a cache salt of its own: its prompt runs unsteered and its
     output steered, so none of its KV blocks may be shared (server/probes in docs/probes.md).
Deny by default: a request submitted outside any request context of the gateway is
refused, and so is a pooling request (it has no sampling parameters to carry a profile)
for which a profile is in effect.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from http import HTTPStatus

import msgspec

from unipool_serve.model_executor.steering import contract
from unipool_serve.model_executor.steering.shape import SteerableModel

from .profile_store import ProbeStore, ProfileStore, UnknownProfile

logger = logging.getLogger("unipool_serve.server")


@dataclass(frozen=True)
class RequestContext:
    """Who sent the HTTP request being served, and what its body asked for."""

    bound: str | None = None  # the API key's mandatory profile
    bound_gate: str | None = None  # the probe that gates it (None: it applies from the start)
    bound_probes: tuple[str, ...] = ()  # probes that score every request of the key
    asked: str | None = None  # the body's `steering` profile
    asked_gate: str | None = None  # the body's `steering.when` probe
    budget: int | None = None  # the body's `expert_budget.top_k`
    capture: int = 0  # contract.CAPTURE_* flags the body asked for
    asked_probes: tuple[str, ...] = ()  # the body's `probes`
    probe_output: bool = False
    is_admin: bool = False
    # (request id the client sees, choice index) -> engine request id, for each request whose results
    # (captured routing, probe scores) the response carries
    captured: dict[tuple[str, int], str] = field(default_factory=dict)
    probe_names: dict[int, str] = field(default_factory=dict)  # engine probe row -> probe name

    @classmethod
    def of(cls, caller) -> RequestContext:
        """The context of a request by `caller` (server/policy.Caller), before its body is read."""
        binding = caller.binding
        return cls(bound=binding.profile, bound_gate=binding.gate, bound_probes=binding.probes,
                   is_admin=caller.is_admin)

    def wants_results(self) -> bool:
        """Does the engine keep something of this request's for its response (capture, probe scores)?"""
        return bool(self.capture or self.asked_probes or self.bound_probes or self.bound_gate or self.asked_gate)


# Set by the gateway for the duration of each HTTP or WebSocket request. Tasks a route
# starts (streaming, background responses) inherit it; AsyncLLM's output handler, which
# serves every request, must never read it.
CURRENT_REQUEST: ContextVar[RequestContext | None] = ContextVar("unipool_request", default=None)


class SteeringRefused(Exception):
    """Raised into vLLM's request path; `as_vllm_error` gives vLLM's client-error type."""

    def __init__(self, status: int, message: str, reason: str, param: str = contract.REQUEST_FIELD):
        super().__init__(message)
        self.status, self.reason, self.param = status, reason, param


def resolve_profile(ctx: RequestContext, in_xargs: str | None) -> str | None:
    """The effective profile name for a request (see the module doc), or raises SteeringRefused."""
    asked = {name for name in (ctx.asked, in_xargs) if name is not None}
    if any(not isinstance(name, str) for name in asked):
        raise SteeringRefused(400, "'steering' must be a profile name (a string)", "invalid_steering_field")
    if len(asked) > 1:
        raise SteeringRefused(400, f"conflicting steering profiles {sorted(asked)}", "conflicting_steering")
    name = next(iter(asked), None)
    if ctx.bound is not None:
        if name is not None and name != ctx.bound:
            raise SteeringRefused(403, f"this API key is bound to steering profile {ctx.bound!r}; it cannot be "
                                  "overridden", "steering_override_forbidden")
        return ctx.bound
    return name


def resolve_gate(ctx: RequestContext, profile: str | None) -> str | None:
    """The probe that gates the effective profile (None: it applies from the start), or raises
    SteeringRefused. A key's binding decides for its requests; a request can gate only a profile
    it asked for itself, and a gated request carries no expert budget of its own."""
    if ctx.bound is not None:
        if ctx.asked_gate is not None and ctx.asked_gate != ctx.bound_gate:
            raise SteeringRefused(403, f"this API key is bound to steering profile {ctx.bound!r}"
                                  + (f" when probe {ctx.bound_gate!r} fires" if ctx.bound_gate else "")
                                  + "; its gate cannot be changed", "steering_override_forbidden")
        gate = ctx.bound_gate
    else:
        gate = ctx.asked_gate
        if gate is not None and profile is None:
            raise SteeringRefused(400, f"'steering.when' names probe {gate!r} but no profile to apply when it fires",
                                  "invalid_steering_field")
    if gate is not None and ctx.budget is not None:
        raise SteeringRefused(400, "an expert_budget cannot be combined with a probe gate (the profile's own budget "
                              "applies once the probe fires)", "invalid_expert_budget")
    return gate


def resolve_budget(asked: int | None, profile_budget: int | None, config) -> int | None:
    """The effective expert budget (contract.effective_budget), or raises SteeringRefused."""
    model = SteerableModel.of(config)
    try:
        return contract.effective_budget(asked, profile_budget, model.top_k, model.shared_experts)
    except contract.BudgetError as exc:
        raise SteeringRefused(400, str(exc), "invalid_expert_budget") from None


class SteeringEnforcer:
    """Wraps the engine-core client's `add_request_async` (see the module doc)."""

    def __init__(self, store: ProfileStore, secret: bytes, on_admit: Callable[[str | None], None] | None = None,
                 on_refuse: Callable[[str], None] | None = None, max_capture_bytes: int = 64 << 20,
                 capture_refused: str | None = None, capture_rows: int | None = None,
                 probes: ProbeStore | None = None):
        self.store, self.secret, self.probes = store, secret, probes
        self.on_admit, self.on_refuse = on_admit, on_refuse
        self.max_capture_bytes = max_capture_bytes
        self.capture_refused = capture_refused  # why this engine cannot capture routing (None: it can)
        self.capture_rows = capture_rows  # layers a capture holds (the MoE layers; None: every layer)

    def install(self, engine_client) -> None:
        """Wrap `engine_client.engine_core.add_request_async` (engine_client: vLLM's AsyncLLM)."""
        engine_core, outputs = engine_client.engine_core, engine_client.output_processor
        submit = engine_core.add_request_async

        async def add_request_async(request):
            try:
                self.apply(request)
            except SteeringRefused as refused:
                if self.on_refuse is not None:
                    self.on_refuse(refused.reason)
                # AsyncLLM registered the request with its output processor before this call and
                # does not take it back for a client error (n = 1): left there it would count as
                # running for ever, and a shutdown would wait its whole grace period for it.
                outputs.abort_requests([request.request_id], internal=True)
                raise as_vllm_error(refused) from None
            return await submit(request)

        engine_core.add_request_async = add_request_async  # instance attribute: this client only

    def apply(self, request) -> None:
        """Rewrite one EngineCoreRequest in place: steering fields, cache salt, row pin."""
        if getattr(request, "abort_immediately", False):
            return  # never scheduled: runs nothing, shares no KV
        ctx = CURRENT_REQUEST.get()
        if ctx is None:
            raise SteeringRefused(403, "request submitted outside any API request: refused", "no_request_context")
        params = request.sampling_params
        if params is None:  # a pooling request
            if ctx.bound is not None or ctx.asked is not None or ctx.budget is not None or ctx.wants_results():
                raise SteeringRefused(403, "steering profiles and probes apply to generation only; this route "
                                      "cannot run under them", "steering_unsupported_route")
            return
        extra = dict(params.extra_args or {})
        name = resolve_profile(ctx, extra.pop(contract.REQUEST_FIELD, None))
        gate = resolve_gate(ctx, name)
        extra = {key: value for key, value in extra.items() if not contract.is_reserved(key)}
        active = None
        if name is not None:
            try:
                active = self.store.get(name)
            except UnknownProfile as exc:
                raise SteeringRefused(400, str(exc), exc.code) from None
        probes = self._probes(ctx, gate)
        profile_budget = contract.parse_budget(active.item.expert_budget) if active else None
        budget = resolve_budget(ctx.budget, profile_budget, self.store.config)
        if active is not None or budget is not None or ctx.capture or probes:
            slot, content = (active.slot, active.content_hash) if active else (0, "")
            row_digest = contract.digest(content)
            gate_row = next((p.slot for n, p in probes.items() if n == gate), None)
            extra.update(contract.steering_args(
                self.secret, name, slot, row_digest, budget, ctx.capture,
                tuple((p.slot, contract.digest(p.content_hash)) for p in probes.values()), gate_row,
                ctx.probe_output))
        if active is not None or budget is not None:  # what the model computes changes: so does the salt
            request.cache_salt = contract.cache_salt(self.secret, active.content_hash if active else "",
                                                     request.cache_salt, budget)
        if gate is not None:
            # Its prompt runs unsteered and its output steered: no KV block of it may be shared
            # either way (a continuation of its output would otherwise read steered blocks).
            request.cache_salt = f"{contract.SALT_PREFIX}gated-{secrets.token_hex(16)}"
        if probes:  # a probe scores every prompt token: none may come from the prefix cache
            params = msgspec.structs.replace(params, skip_reading_prefix_cache=True)
        if ctx.capture:
            self._mark_for_capture(request, params, ctx)
        if ctx.capture or probes:
            self._keep_results(request, ctx)
        for loaded in ([active] if active is not None else []) + list(probes.values()):
            (self.store if loaded is active else self.probes).pin(loaded, request.request_id)
        # A fresh SamplingParams per engine request: vLLM may share one object between the
        # children of an n > 1 request or the beams of a beam search.
        request.sampling_params = msgspec.structs.replace(params, extra_args=extra or None)
        if self.on_admit is not None:
            self.on_admit(name)

    def _mark_for_capture(self, request, params, ctx: RequestContext) -> None:
        if self.capture_refused is not None:
            raise SteeringRefused(400, self.capture_refused, "capture_unsupported")
        model = SteerableModel.of(self.store.config)
        if ctx.capture & contract.CAPTURE_LOGITS:
            tokens = len(request.prompt_token_ids or ()) + (params.max_tokens or 0) - 1
            rows = model.num_layers - len(model.dense_layers) if self.capture_rows is None else self.capture_rows
            size = max(tokens, 0) * rows * model.num_experts * 2  # float16
            if size > self.max_capture_bytes:
                raise SteeringRefused(400, f"return_router_logits would capture {size} bytes for this request "
                                      f"(prompt + max_tokens); the server's limit is {self.max_capture_bytes} bytes "
                                      "(--max-capture-bytes)", "capture_too_large")
        # A salt of its own: no prompt token comes from the prefix cache, so every one has routing.
        request.cache_salt = f"{contract.SALT_PREFIX}capture-{secrets.token_hex(16)}"

    def _probes(self, ctx: RequestContext, gate: str | None) -> dict:
        """name -> loaded probe, for every probe that scores this request (asked, bound, the gate)."""
        names = list(dict.fromkeys((*ctx.asked_probes, *ctx.bound_probes, *([gate] if gate else []))))
        if not names:
            return {}
        if self.capture_refused is not None or self.probes is None:
            raise SteeringRefused(400, "probes read the routing capture: "
                                  + (self.capture_refused or "this server loads no probes"), "probes_unsupported",
                                  contract.PROBES_FIELD)
        loaded = {}
        for name in names:
            try:
                loaded[name] = self.probes.get(name)
            except UnknownProfile as exc:
                raise SteeringRefused(400, str(exc), exc.code, contract.PROBES_FIELD) from None
            ctx.probe_names[loaded[name].slot] = name
        return loaded

    def _keep_results(self, request, ctx: RequestContext) -> None:
        """Record which choice of the response this engine request is, for server/capture.py."""
        child = re.match(r"^(\d+)_(.+)$", request.request_id)
        index = int(child.group(1)) if child and child.group(2).startswith(f"{request.external_req_id}-") else 0
        ctx.captured[(request.external_req_id, index)] = request.request_id


def as_vllm_error(refused: SteeringRefused) -> Exception:
    """The vLLM exception its serving routes turn into this status in the OpenAI envelope."""
    from vllm.exceptions import GracefulHTTPError, VLLMValidationError

    if refused.status == 400:
        return VLLMValidationError(str(refused), parameter=refused.param)
    return GracefulHTTPError(str(refused), HTTPStatus(refused.status))
