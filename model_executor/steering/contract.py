"""The one contract between the API process and the engine's workers for per-request steering.

A client names a profile with the request field `steering` (top level, or in `vllm_xargs`)
and an expert budget with `expert_budget: {"top_k": k'}`. The API process's enforcement
point (server/enforcement.py) is the only writer of the reserved `unipool_*` keys of a
request's `SamplingParams.extra_args`: it strips whatever a client sent and writes the
profile's name, its engine table row (slot; 0 for a budget without a profile), its digest,
the budget, and an HMAC signature keyed by a secret that the API process pushes to every
worker once, at start. A worker (steering/worker.py) steers a request only when the signature checks out
and its row still holds that digest; anything else is served unsteered and logged (the
worker cannot refuse a request: an exception there would stop the engine for everyone).

The expert budget's rule lives here too (`parse_budget`, `effective_budget`): the gateway,
the enforcement point, profile validation and offline use all apply this one.

Worker RPCs (`collective_rpc`), all authenticated by the same secret where they change state:
  RPC_SET_SECRET(secret_hex)                  once; a second, different secret is refused
  RPC_SET_PROFILE(slot, rows, digest, auth)   write one table row: rows {table: [L][E] values},
                                              one key per per-profile table (ROW_TABLES);
                                              rows None clears the row
  RPC_ROUTING_STATS()                         cumulative [L, E] routing counts
  RPC_STEERING_ROWS()                         {slot: digest} (tests, debugging)
  RPC_TAKE_CAPTURE(request_ids)               captured routing of finished requests
  RPC_CAPTURE_LAYERS()                        the decoder layer of each captured row (None: no capture)
  RPC_SET_PROBE(slot, rows, digest, auth)     write one probe row: rows {"weight": [R][E], "bias",
                                              "threshold"}; rows None clears it
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import NamedTuple

REQUEST_FIELD = "steering"
BUDGET_FIELD = "expert_budget"  # {"top_k": k'}
RESERVED_PREFIX = "unipool_"
ARG_NAME = "unipool_steering"
ARG_SLOT = "unipool_steering_slot"
ARG_DIGEST = "unipool_steering_digest"
ARG_TOP_K = "unipool_expert_budget_top_k"
ARG_CAPTURE = "unipool_capture"  # CAPTURE_* flags
ARG_PROBES = "unipool_probes"  # [[probe row, digest], ...]
ARG_GATE = "unipool_gate"  # the probe row whose firing turns the profile's row on (None: on from the start)
ARG_PROBE_OUTPUT = "unipool_probe_output"  # also score the generated tokens
ARG_SIGNATURE = "unipool_steering_sig"
PROBES_FIELD = "probes"  # request: ["name", ...] (in vllm_xargs: "name,name")
PROBE_OUTPUT_FIELD = "probe_output"  # request: true to score the generated tokens too
GATE_FIELD = "when"  # request: "steering": {"profile": P, "when": Q} (in vllm_xargs: "steering_when": Q)
XARGS_GATE_FIELD = "steering_when"
CAPTURE_EXPERTS, CAPTURE_LOGITS = 1, 2  # what a request's routing capture holds (flags, or-ed)
CAPTURE_FIELDS = {"return_routed_experts": CAPTURE_EXPERTS, "return_router_logits": CAPTURE_LOGITS}  # field -> flag
ROW_TABLES = ("bias", "mask")  # the per-profile tables one engine row spans (steering/table.py)

RPC_SET_SECRET = "unipool_set_secret"
RPC_SET_PROFILE = "unipool_set_profile"
RPC_ROUTING_STATS = "unipool_routing_stats"
RPC_STEERING_ROWS = "unipool_steering_rows"
RPC_TAKE_CAPTURE = "unipool_take_capture"
RPC_CAPTURE_LAYERS = "unipool_capture_layers"
RPC_SET_PROBE = "unipool_set_probe"
RPC_NAMES = (RPC_SET_SECRET, RPC_SET_PROFILE, RPC_ROUTING_STATS, RPC_STEERING_ROWS, RPC_TAKE_CAPTURE,
             RPC_CAPTURE_LAYERS, RPC_SET_PROBE)

DIGEST_CHARS = 16  # of a profile's sha256 content hash: what the engine compares rows by
SALT_PREFIX = "unipool-"


def digest(content_hash: str) -> str:
    """The short form of a profile's content hash that names its content in the engine."""
    return content_hash[:DIGEST_CHARS]


def is_reserved(key: str) -> bool:
    return key.startswith(RESERVED_PREFIX)


def _mac(secret: bytes, *parts: object) -> str:
    message = "\x1f".join(str(p) for p in parts).encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


class Steering(NamedTuple):
    """What one request runs under: a table row (0: none) holding `digest`, a budget (None: all k),
    which of its routing to capture (0: none), the probes that score it ((slot, digest) pairs of the
    engine's probe rows) and the probe that gates its row (None: the row applies from the start;
    a slot: only once that probe has fired on the prompt)."""

    row: int
    digest: str
    budget: int | None
    capture: int = 0
    probes: tuple[tuple[int, str], ...] = ()
    gate: int | None = None
    probe_output: bool = False  # also score the generated tokens


NO_ROW = Steering(0, "", None)


def _signed_parts(slot, row_digest, budget, capture, probes, gate, probe_output) -> tuple:
    return ("row", slot, row_digest, budget, capture, json.dumps([list(p) for p in probes]), gate, bool(probe_output))


def steering_args(secret: bytes, name: str | None, slot: int, row_digest: str, budget: int | None = None,
                  capture: int = 0, probes: tuple[tuple[int, str], ...] = (), gate: int | None = None,
                  probe_output: bool = False) -> dict:
    """The reserved extra_args that steer a request with one table row, an expert budget, capture its
    routing and/or score it with probes (signed: clients never see these fields, and cannot produce them)."""
    probes = tuple((int(s), str(d)) for s, d in probes)
    parts = _signed_parts(slot, row_digest, budget, capture, probes, gate, probe_output)
    return {ARG_NAME: name, ARG_SLOT: slot, ARG_DIGEST: row_digest, ARG_TOP_K: budget, ARG_CAPTURE: capture,
            ARG_PROBES: [list(p) for p in probes], ARG_GATE: gate, ARG_PROBE_OUTPUT: bool(probe_output),
            ARG_SIGNATURE: _mac(secret, *parts)}


def verified_row(extra_args: Mapping | None, secret: bytes | None) -> Steering | None:
    """The signed Steering in `extra_args`, or None when they carry none.

    Raises ValueError when steering fields are present but not signed by `secret`.
    """
    if not extra_args or ARG_SLOT not in extra_args:
        return None
    slot, row_digest, budget = extra_args.get(ARG_SLOT), extra_args.get(ARG_DIGEST), extra_args.get(ARG_TOP_K)
    capture, signature = extra_args.get(ARG_CAPTURE, 0), extra_args.get(ARG_SIGNATURE)
    gate, probe_output = extra_args.get(ARG_GATE), extra_args.get(ARG_PROBE_OUTPUT, False)
    if secret is None:
        raise ValueError("steering fields present but this engine never received the API process's secret")
    try:
        probes = tuple((int(s), str(d)) for s, d in extra_args.get(ARG_PROBES) or ())
    except (TypeError, ValueError):
        raise ValueError("steering fields not signed by the API process") from None
    expected = _mac(secret, *_signed_parts(slot, row_digest, budget, capture, probes, gate, probe_output))
    if not isinstance(signature, str) or not hmac.compare_digest(signature, expected):
        raise ValueError("steering fields not signed by the API process")
    return Steering(int(slot), str(row_digest), None if budget is None else int(budget), int(capture), probes,
                    None if gate is None else int(gate), bool(probe_output))


def profile_auth(secret: bytes, slot: int, row_digest: str | None, kind: str = "profile") -> str:
    """Authenticates one RPC_SET_PROFILE (or, kind "probe", RPC_SET_PROBE) call (digest None: clear the row)."""
    return _mac(secret, kind, slot, row_digest)


def set_profile_args(secret: bytes, slot: int, profile) -> tuple:
    """RPC_SET_PROFILE's arguments for writing `profile` (a SteeringProfile) into `slot`, or
    clearing it (profile None). Plain lists: tensors do not survive the engine core's
    re-pickling to the workers."""
    if profile is None:
        return (slot, None, None, profile_auth(secret, slot, None))
    row_digest = digest(profile.content_hash())
    rows = {table: values.tolist() for table, values in profile.engine_rows().items()}
    return (slot, rows, row_digest, profile_auth(secret, slot, row_digest))


def set_probe_args(secret: bytes, slot: int, probe) -> tuple:
    """RPC_SET_PROBE's arguments for writing `probe` (a RoutingProbe) into `slot`, or clearing it (None)."""
    if probe is None:
        return (slot, None, None, profile_auth(secret, slot, None, "probe"))
    row_digest = digest(probe.content_hash())
    rows = {"weight": probe.weight.tolist(), "bias": float(probe.bias), "threshold": float(probe.threshold)}
    return (slot, rows, row_digest, profile_auth(secret, slot, row_digest, "probe"))


# ---- the expert budget: {"top_k": k'} ------------------------------------------------


class BudgetError(ValueError):
    """An expert budget that cannot be used; the message names the field and what it accepts."""


def parse_budget(field, what: str = f"'{BUDGET_FIELD}'") -> int | None:
    """`{"top_k": k'}` -> k' (an integer >= 0); None when absent; BudgetError otherwise."""
    if field is None:
        return None
    top_k = field.get("top_k") if isinstance(field, dict) and set(field) == {"top_k"} else None
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise BudgetError(f"{what} must be {{\"top_k\": <integer >= 0>}}, got {field!r:.80}")
    return top_k


def effective_budget(asked: int | None, profile_budget: int | None, top_k: int, shared_experts: bool) -> int | None:
    """The budget a request runs with: the smaller of its own and its profile's (a request can
    lower its profile's budget, never raise it); None means the model's full top-k.
    BudgetError when the model cannot run it."""
    given = [b for b in (asked, profile_budget) if b is not None]
    if not given:
        return None
    budget = min(given)
    if budget > top_k:
        raise BudgetError(f"{BUDGET_FIELD}.top_k={budget} exceeds the model's top_k={top_k}")
    if budget == 0 and not shared_experts:
        raise BudgetError(f"{BUDGET_FIELD}.top_k=0 leaves nothing to compute: this model has no shared expert")
    return None if budget == top_k else budget


def cache_salt(secret: bytes, content_hash: str, user_salt: str | None, top_k: int | None = None) -> str:
    """The prefix-cache salt of a steered request: unique to (user salt, profile content, budget).

    Keyed by the secret, so no client can compute another profile's salt and share its KV
    blocks; within vLLM's limits (<= 128 characters, no '@', '/' or '\\').
    """
    return SALT_PREFIX + _mac(secret, "salt", user_salt or "", content_hash, top_k)[:48]
