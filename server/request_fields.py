"""The request fields that are ours, taken out of a JSON body before vLLM's route sees it.

  steering             a profile name, or {"profile": P, "when": Q}: P applies once probe Q fires
                       on the prompt (also `vllm_xargs.steering` and `vllm_xargs.steering_when`)
  expert_budget        {"top_k": k'} (steering/contract.py's rule)
  return_routed_experts, return_router_logits
                       routing capture (completions and chat only: their responses carry it)
  probes               ["name", ...]: probes that score the request (also `vllm_xargs.probes`,
                       "name,name")
  probe_output         true: score the generated tokens too

vLLM would drop unknown top-level fields silently and pass `vllm_xargs` on unchecked, so all
of them are popped here, validated (400 naming the field) and handed to the enforcement point
through the request context; reserved `vllm_xargs` keys are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from unipool_serve.model_executor.steering import contract
from unipool_serve.model_executor.steering.profile import NAME_PATTERN, NAME_RULE

from .errors import APIError

CAPTURE_ROUTES = {"/v1/completions", "/v1/chat/completions"}  # whose responses server/capture.py fills
MAX_PROBES = 16


@dataclass(frozen=True)
class OurFields:
    """What a body asked for (None / empty: nothing)."""

    profile: str | None = None  # the top-level `steering`
    profile_in_xargs: str | None = None  # `vllm_xargs.steering`
    gate: str | None = None  # the probe that gates the profile (either place)
    budget: int | None = None
    capture: int = 0
    probes: tuple[str, ...] = ()
    probe_output: bool = False
    present: bool = False  # the body held any of them (it must then be rewritten without them)


def take_fields(request: dict, template: str) -> OurFields:
    """Pop our fields from a parsed JSON body (the dict is changed in place); APIError for bad input."""
    present = any(key in request for key in (contract.REQUEST_FIELD, contract.BUDGET_FIELD, contract.PROBES_FIELD,
                                             contract.PROBE_OUTPUT_FIELD, *contract.CAPTURE_FIELDS))
    try:
        budget = contract.parse_budget(request.pop(contract.BUDGET_FIELD, None))
    except contract.BudgetError as exc:
        raise APIError(400, str(exc), param=contract.BUDGET_FIELD, code="invalid_expert_budget") from None
    capture = capture_flags(request, template)
    profile, gate = _steering(request.pop(contract.REQUEST_FIELD, None))
    probes = _probe_names(request.pop(contract.PROBES_FIELD, None), contract.PROBES_FIELD)
    probe_output = request.pop(contract.PROBE_OUTPUT_FIELD, False)
    if not isinstance(probe_output, bool):
        raise APIError(400, f"'{contract.PROBE_OUTPUT_FIELD}' must be true or false, got {probe_output!r:.40}",
                       param=contract.PROBE_OUTPUT_FIELD, code="invalid_probes")
    xargs = request.get("vllm_xargs")
    in_xargs = xgate = None
    if isinstance(xargs, dict):
        reserved = sorted(k for k in xargs if isinstance(k, str) and contract.is_reserved(k))
        if reserved:
            raise APIError(400, f"vllm_xargs keys {reserved} are reserved for the server", param="vllm_xargs",
                           code="reserved_vllm_xargs")
        ours = (contract.REQUEST_FIELD, contract.XARGS_GATE_FIELD, contract.PROBES_FIELD)
        if any(key in xargs for key in ours):
            present = True
            in_xargs = _name(xargs.pop(contract.REQUEST_FIELD, None), contract.REQUEST_FIELD)
            xgate = _name(xargs.pop(contract.XARGS_GATE_FIELD, None), f"vllm_xargs.{contract.XARGS_GATE_FIELD}")
            listed = xargs.pop(contract.PROBES_FIELD, None)
            if listed is not None and not isinstance(listed, str):
                raise APIError(400, "vllm_xargs.probes must be a string of probe names, \"a,b\"",
                               param="vllm_xargs.probes", code="invalid_probes")
            probes += _probe_names(listed.split(",") if listed else None, "vllm_xargs.probes")
            if not xargs:
                request.pop("vllm_xargs")
    if gate is not None and xgate is not None and gate != xgate:
        raise APIError(400, f"conflicting probe gates {sorted({gate, xgate})}", param=contract.REQUEST_FIELD,
                       code="conflicting_steering")
    return OurFields(profile, in_xargs, gate or xgate, budget, capture, tuple(dict.fromkeys(probes)), probe_output,
                     present)


def _steering(value) -> tuple[str | None, str | None]:
    """(profile, gate) of the top-level `steering`: a name, or {"profile": P, "when": Q}."""
    if isinstance(value, dict):
        unknown = set(value) - {"profile", contract.GATE_FIELD}
        if unknown or "profile" not in value:
            raise APIError(400, "'steering' as an object is {\"profile\": P, \"when\": PROBE}, got "
                           f"{value!r:.80}", param=contract.REQUEST_FIELD, code="invalid_steering_field")
        return _name(value["profile"], "steering.profile"), _name(value.get(contract.GATE_FIELD), "steering.when")
    return _name(value, contract.REQUEST_FIELD), None


def _name(value, field: str) -> str | None:
    if value is not None and not (isinstance(value, str) and NAME_PATTERN.match(value)):
        what = "a probe" if field.endswith(("when", contract.XARGS_GATE_FIELD)) else "a profile"
        raise APIError(400, f"'{field}' must be {what} name ({NAME_RULE}), got {value!r:.80}", param=field,
                       code="invalid_steering_field")
    return value


def _probe_names(value, field: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_PROBES \
            or not all(isinstance(v, str) and NAME_PATTERN.match(v) for v in value):
        raise APIError(400, f"'{field}' must be a list of at most {MAX_PROBES} probe names ({NAME_RULE}), got "
                       f"{value!r:.80}", param=field, code="invalid_probes")
    return tuple(value)


def capture_flags(request: dict, template: str) -> int:
    """The routing-capture flags a request asks for (popped from it); APIError when it cannot have them."""
    flags = 0
    for name, flag in contract.CAPTURE_FIELDS.items():
        value = request.pop(name, False)
        if not isinstance(value, bool):
            raise APIError(400, f"'{name}' must be true or false, got {value!r:.40}", param=name, code="invalid_capture")
        flags |= flag if value else 0
    if not flags:
        return 0
    if template not in CAPTURE_ROUTES:
        raise APIError(400, f"routing capture is served on {sorted(CAPTURE_ROUTES)} only", code="invalid_capture")
    prompt = request.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 1 and not all(isinstance(t, int) for t in prompt):
        raise APIError(400, "routing capture takes one prompt per request", param="prompt", code="invalid_capture")
    return flags
