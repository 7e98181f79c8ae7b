"""The one contract between the API process and the engine's workers for per-request steering.

A client names a profile with the request field `steering` (top level, or in `vllm_xargs`).
The API process's enforcement point (server/enforcement.py) is the only writer of the
reserved `unipool_*` keys of a request's `SamplingParams.extra_args`: it strips whatever a
client sent and writes the profile's name, its engine table row (slot), its digest and an
HMAC signature keyed by a secret that the API process pushes to every worker once, at
start. A worker (steering/worker.py) steers a request only when the signature checks out
and its row still holds that digest; anything else is served unsteered and logged (the
worker cannot refuse a request: an exception there would stop the engine for everyone).

Worker RPCs (`collective_rpc`), all authenticated by the same secret where they change state:
  RPC_SET_SECRET(secret_hex)                        once; a second, different secret is refused
  RPC_SET_PROFILE(slot, bias, mask, digest, auth, routed_scale)
                                                    write (or clear, bias None) one table row
  RPC_ROUTING_STATS()                               cumulative [L, E] routing counts
  RPC_STEERING_ROWS()                               {slot: digest} (tests, debugging)
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

REQUEST_FIELD = "steering"
RESERVED_PREFIX = "unipool_"
ARG_NAME = "unipool_steering"
ARG_SLOT = "unipool_steering_slot"
ARG_DIGEST = "unipool_steering_digest"
ARG_SIGNATURE = "unipool_steering_sig"

RPC_SET_SECRET = "unipool_set_secret"
RPC_SET_PROFILE = "unipool_set_profile"
RPC_ROUTING_STATS = "unipool_routing_stats"
RPC_STEERING_ROWS = "unipool_steering_rows"

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


def steering_args(secret: bytes, name: str, slot: int, row_digest: str) -> dict:
    """The reserved extra_args that steer a request with one table row (signed: clients never
    see these fields, and cannot produce them)."""
    return {ARG_NAME: name, ARG_SLOT: slot, ARG_DIGEST: row_digest,
            ARG_SIGNATURE: _mac(secret, "row", slot, row_digest)}


def verified_row(extra_args: Mapping | None, secret: bytes | None) -> tuple[int, str] | None:
    """(slot, digest) when `extra_args` carry a signed steering row, None when they carry none.

    Raises ValueError when steering fields are present but not signed by `secret`.
    """
    if not extra_args or ARG_SLOT not in extra_args:
        return None
    slot, row_digest, signature = extra_args.get(ARG_SLOT), extra_args.get(ARG_DIGEST), extra_args.get(ARG_SIGNATURE)
    if secret is None:
        raise ValueError("steering fields present but this engine never received the API process's secret")
    expected = _mac(secret, "row", slot, row_digest)
    if not isinstance(signature, str) or not hmac.compare_digest(signature, expected):
        raise ValueError("steering fields not signed by the API process")
    return int(slot), str(row_digest)


def profile_auth(secret: bytes, slot: int, row_digest: str | None) -> str:
    """Authenticates one RPC_SET_PROFILE call (digest None: clear the row)."""
    return _mac(secret, "profile", slot, row_digest)


def set_profile_args(secret: bytes, slot: int, profile) -> tuple:
    """RPC_SET_PROFILE's arguments for writing `profile` (a SteeringProfile) into `slot`, or
    clearing it (profile None). Plain lists: tensors do not survive the engine core's
    re-pickling to the workers."""
    if profile is None:
        return (slot, None, None, None, profile_auth(secret, slot, None), 1.0)
    row_digest = digest(profile.content_hash())
    return (slot, profile.bias_rows().tolist(), profile.mask_rows().tolist(), row_digest,
            profile_auth(secret, slot, row_digest), profile.routed_scale())


def cache_salt(secret: bytes, content_hash: str, user_salt: str | None) -> str:
    """The prefix-cache salt of a steered request: unique to (user salt, profile content).

    Keyed by the secret, so no client can compute another profile's salt and share its KV
    blocks; within vLLM's limits (<= 128 characters, no '@', '/' or '\\').
    """
    return SALT_PREFIX + _mac(secret, "salt", user_salt or "", content_hash)[:48]
