"""Routing probes inside the engine: each probed request's routing distribution, scored when its prompt ends.

The API process writes each loaded probe into a row of the worker's `ProbeRows` (RPC_SET_PROBE:
weight [R, E], bias, threshold) and signs, into a request's steering fields, which probes score
it and which one gates its profile (steering/contract.py). `ProbedRequests` then follows every
probed request from the capture buffers the model fills anyway (routing_capture.py: the raw
router logits of every MoE layer, each step): after a step's forward the worker copies the
step's logits to the host once (not per layer), and for each probed request adds the softmax
of its prompt tokens' logits to a running sum [R, E]. When the step holds the request's last
prompt token, every probe scores the mean (steering/probe.py's rule) and a gate probe that
fires opens the gate: the request's profile row applies to its tokens from the prompt's end
on, i.e. from the next step (RequestRows.per_token). With `output`, the generated tokens the
model computes are summed apart and scored when the API process takes the results.

A gate's state is kept by request, so a request recomputed after a preemption keeps its
decision and its prompt stays unsteered. Nothing here changes a token of a request that is
not gated; nothing of a probe's work runs on the device.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..routing_capture import RoutingCapture
from . import contract


@dataclass
class ProbeRow:
    weight: np.ndarray  # [R, E] float64
    bias: float
    threshold: float
    digest: str

    def score(self, mean_distribution: np.ndarray) -> float:
        z = float((self.weight * mean_distribution).sum()) + self.bias
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


class ProbeRows:
    """The engine's probe table: row -> ProbeRow (written by RPC_SET_PROBE)."""

    def __init__(self, num_rows: int, num_experts: int, max_probes: int):
        self.shape, self.max_probes = (num_rows, num_experts), max_probes
        self.rows: dict[int, ProbeRow] = {}

    def set_row(self, slot: int, rows: dict, row_digest: str) -> None:
        self._check_slot(slot)
        weight = np.asarray(rows["weight"], dtype=np.float64)
        if weight.shape != self.shape:
            raise ValueError(f"probe weight {list(weight.shape)}; this engine captures {list(self.shape)}")
        self.rows[slot] = ProbeRow(weight, float(rows["bias"]), float(rows["threshold"]), row_digest)

    def clear_row(self, slot: int) -> None:
        self._check_slot(slot)
        self.rows.pop(slot, None)

    def holds(self, slot: int, row_digest: str) -> bool:
        row = self.rows.get(slot)
        return row is not None and row.digest == row_digest

    def _check_slot(self, slot: int) -> None:
        if not 1 <= slot <= self.max_probes:
            raise ValueError(f"probe row {slot} outside 1..{self.max_probes}")


@dataclass
class ProbedRequest:
    probes: tuple[tuple[int, str], ...]  # (row, digest)
    gate: int | None
    output: bool
    prompt_len: int
    prompt_sum: np.ndarray
    output_sum: np.ndarray
    prompt_tokens: set[int] = field(default_factory=set)  # positions summed (a recomputation adds none twice)
    output_tokens: set[int] = field(default_factory=set)
    scores: dict[int, float] | None = None  # row -> prompt score, once the prompt is done
    gate_from: int | None = None  # first position the profile's row applies to (None: not open)


class ProbedRequests:
    """Probed requests by key, until the API process takes their scores."""

    def __init__(self, table: ProbeRows, capture: RoutingCapture):
        self.table, self.capture = table, capture
        self._requests: dict[Hashable, ProbedRequest] = {}

    def admit(self, key: Hashable, steering: contract.Steering, prompt_len: int) -> None:
        if key in self._requests or not (steering.probes or steering.gate is not None):
            return
        zeros = np.zeros(self.table.shape)
        self._requests[key] = ProbedRequest(steering.probes, steering.gate, steering.probe_output, prompt_len,
                                            zeros, zeros.copy())

    def wants(self, key: Hashable) -> bool:
        return key in self._requests

    def gate_from(self, key: Hashable) -> int | None:
        """The first position the gated profile applies to; None while (or if never) its probe fires."""
        request = self._requests.get(key)
        return None if request is None else request.gate_from

    def collect(self, key: Hashable, positions: np.ndarray, distributions: np.ndarray) -> None:
        """Add one request's tokens of this step: positions [n], softmax of their raw logits [n, R, E]."""
        request = self._requests[key]
        for position, distribution in zip(positions.tolist(), distributions):
            if position < request.prompt_len:
                if position not in request.prompt_tokens:
                    request.prompt_tokens.add(position)
                    request.prompt_sum += distribution
            elif request.output and position not in request.output_tokens:
                request.output_tokens.add(position)
                request.output_sum += distribution
        if request.scores is None and len(request.prompt_tokens) >= request.prompt_len:
            self._score_prompt(request)

    def _score_prompt(self, request: ProbedRequest) -> None:
        mean = request.prompt_sum / max(len(request.prompt_tokens), 1)
        request.scores = {slot: self._row(slot, digest).score(mean) if self._row(slot, digest) else float("nan")
                          for slot, digest in request.probes}
        if request.gate is not None:
            gate_row = self.table.rows.get(request.gate)
            score = request.scores.get(request.gate)
            if gate_row is not None and score is not None and score >= gate_row.threshold:
                request.gate_from = request.prompt_len

    def _row(self, slot: int, row_digest: str) -> ProbeRow | None:
        return self.table.rows[slot] if self.table.holds(slot, row_digest) else None

    def take(self, key: Hashable) -> dict | None:
        """{row: {"score", "fired"[, "output_score", "output_fired"]}} of a request, forgotten afterwards;
        None when it was not probed. A probe whose row changed since admission scores NaN."""
        request = self._requests.pop(key, None)
        if request is None:
            return None
        if request.scores is None:
            self._score_prompt(request)  # a prompt that never finished: what was computed of it
        taken = {}
        for slot, digest in request.probes:
            row, score = self._row(slot, digest), request.scores.get(slot, float("nan"))
            # plain floats and bools: the answer crosses vLLM's msgpack RPC
            entry = {"score": float(score), "fired": bool(row is not None and score >= row.threshold)}
            if request.output and request.output_tokens and row is not None:
                output_score = row.score(request.output_sum / len(request.output_tokens))
                entry |= {"output_score": float(output_score), "output_fired": bool(output_score >= row.threshold)}
            taken[slot] = entry
        return taken

    def prune(self, live) -> None:
        for key in [k for k in self._requests if k not in live]:
            del self._requests[key]


def collect_probed(probed: ProbedRequests, spans: list[tuple[str, int, int]], positions) -> None:
    """One host copy of the step's raw logits of the probed tokens, then each request's distributions."""
    steps = positions.cpu().numpy()
    logits = probed.capture.step_logits(positions.shape[0])  # [R, T, E] fp16, filled by this step's forward
    for request_id, start, end in spans:
        distributions = torch.softmax(logits[:, start:end].to("cpu", torch.float64), dim=-1)  # [R, n, E]
        probed.collect(request_id, steps[start:end], distributions.transpose(0, 1).numpy())
