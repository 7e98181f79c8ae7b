"""`RequestRows`: what each request of the engine runs under, as its worker sees it.

A request's steering fields are verified once, when it enters the batch (signed by the API
process's enforcement point, steering/contract.py); each step then asks which table row and
budget each of its tokens uses: none when the fields are missing or forged, when the row has
been rewritten since admission, or, for a request whose profile a probe gates, before that
probe has fired (steering/probing.py). Keyed by whatever the model runner tracks requests
with (V1: request id, V2: request index). Pure Python: tested without an engine.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable

import numpy as np

from ..routing_capture import CapturedRequests
from . import contract
from .probing import ProbedRequests
from .table import SteeringTable, expand_rows

logger = logging.getLogger("unipool_serve.worker")


class RequestRows:
    """Each request's verified steering (row and budget), by whatever key a model runner tracks
    requests with, and the requests whose routing is captured or probed."""

    def __init__(self, table: SteeringTable, captured: CapturedRequests | None = None,
                 probed: ProbedRequests | None = None):
        self.table, self.captured, self.probed = table, captured, probed
        self.secret: bytes | None = None
        self._rows: dict[Hashable, contract.Steering | None] = {}
        self._warned: set[Hashable] = set()

    def _warn(self, key: Hashable, message: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.error("request %s: " + message + ": served unsteered", key, *args)

    def admit(self, key: Hashable, sampling_params, prompt_len: int = 0) -> None:
        """Verify a request's steering fields once, when it enters the batch."""
        extra = sampling_params.extra_args if sampling_params is not None else None  # None: pooling
        try:
            self._rows[key] = contract.verified_row(extra, self.secret)
        except ValueError as exc:
            self._rows[key] = None
            self._warn(key, "%s", exc)
        verified = self._rows[key]
        if verified is not None and verified.capture and self.captured is not None:
            self.captured.admit(key, verified.capture, getattr(sampling_params, "routed_experts_prompt_start", 0))
        if verified is not None and self.probed is not None:
            self.probed.admit(key, verified, prompt_len)
        if self._rows[key] is None and extra and contract.REQUEST_FIELD in extra:
            self._warn(key, "asks for steering %r, which no enforcement point resolved (run unipool-serve, "
                       "or set VLLM_PLUGINS=unipool,unipool_api)", extra[contract.REQUEST_FIELD])

    def forget(self, key: Hashable) -> None:
        self._rows.pop(key, None)
        self._warned.discard(key)

    def plain(self, keys) -> bool:
        """Do these requests all run plainly (no row, budget, capture or probe)? A step of such requests
        needs no per-request work: its hook writes nothing and the model's plain variant runs."""
        return all(self._rows.get(k) is None for k in keys)

    def known(self, key: Hashable) -> bool:
        return key in self._rows

    def prune(self, live) -> None:
        """Forget the requests not in `live` (a container of keys)."""
        for key in [k for k in self._rows if k not in live]:
            self.forget(key)
        for follower in (self.captured, self.probed):
            if follower is not None:
                follower.prune(live)

    def __len__(self) -> int:
        return len(self._rows)

    def steering(self, key: Hashable) -> contract.Steering:
        """What this request runs under this step (unsteered when its row was rewritten since, and,
        when a probe gates its row, until that probe has fired)."""
        verified = self._rows.get(key)
        if verified is None:
            return contract.NO_ROW
        if not self.table.holds(verified.row, verified.digest):
            self._warn(key, "steering row %s no longer holds profile digest %s", verified.row, verified.digest)
            return contract.NO_ROW
        if verified.gate is not None and self.gate_from(key) is None:
            return contract.NO_ROW
        return verified

    def records(self, keys) -> bool:
        """Does any of these requests want this step's routing (captured, or scored by a probe)?"""
        return any((self.captured is not None and self.captured.wants(k)) or
                   (self.probed is not None and self.probed.wants(k)) for k in keys)

    def gate_from(self, key: Hashable) -> int | None:
        """The first position a gated request's row applies to (None: not open, or not gated)."""
        return None if self.probed is None else self.probed.gate_from(key)

    def per_token(self, keys, query_start_loc, positions: np.ndarray | None = None
                  ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(rows, budgets) of each token of the step, or None for what no request of it uses. A gated
        request's row (and budget) cover its tokens from the gate's position on (`positions` [N]: each
        token's position; without them, all its tokens: a decode step)."""
        steering = [self.steering(k) for k in keys]
        rows = np.fromiter((s.row for s in steering), dtype=np.int32, count=len(steering))
        budgets = np.fromiter((self.table.top_k if s.budget is None else s.budget for s in steering),
                              dtype=np.int32, count=len(steering))
        token_rows = expand_rows(rows, query_start_loc) if rows.any() else None
        token_budgets = expand_rows(budgets, query_start_loc) if (budgets != self.table.top_k).any() else None
        if positions is not None and token_rows is not None:
            for i, (key, s) in enumerate(zip(keys, steering)):
                if s.gate is not None:  # open (else its row is 0): not before the prompt's end
                    span = slice(int(query_start_loc[i]), int(query_start_loc[i + 1]))
                    before = positions[span] < self.gate_from(key)
                    token_rows[span][before] = 0
                    if token_budgets is not None:
                        token_budgets[span][before] = self.table.top_k
        return token_rows, token_budgets
