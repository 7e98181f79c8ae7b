"""Per-request routing capture: the experts (and router logits) each token of a request was routed with.

Device side, `RoutingCapture`: in a step where some request wants its routing (captured or
probed: `step_records`, set by the worker before the step), each MoE layer copies its routing
decision (`topk_ids` after steering and budgets; dropped slots hold id E) and its raw router
logits (fp16, before steering) into persistent buffers, [max_tokens, k] and [max_tokens, E] per row:
one small copy per layer. Other steps run the model's plain variant, which records nothing
(steering/idle_steps.py; what the copies cost: docs/benchmarks.md). Row r holds
decoder layer `layers[r]`: every layer of a UniPool model, the MoE layers of one of vLLM's
families (layers without experts have no row). Our own model records both at once
(`record`); a family's gate hook records the logits and its router tap the ids
(steering/family_hooks.py). Off with UNIPOOL_ROUTING_CAPTURE=0 (then no buffer exists and
capture requests are refused at the API).

Host side, `CapturedRequests` (in the worker): after a step's forward, the rows of the
requests that asked are copied out by token position (`positions` of the step), so a
prompt split over several steps, and a request recomputed after preemption, end up with one
row per position (the last computation wins). `take` hands them to the API process as
`.npy` bytes in vLLM's `routed_experts` encoding: [tokens, layers, top_k], uint8 when the
ids fit (fewer than 256 experts), else uint16; logits [tokens, layers, experts] float16.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from torch import nn

from .steering.contract import CAPTURE_EXPERTS, CAPTURE_LOGITS


class _Row(nn.Module):
    """One layer's capture buffers."""

    def __init__(self, max_tokens: int, num_experts: int, top_k: int):
        super().__init__()
        self.register_buffer("ids", torch.zeros(max_tokens, top_k, dtype=torch.int32), persistent=False)
        self.register_buffer("logits", torch.zeros(max_tokens, num_experts, dtype=torch.float16), persistent=False)


class RoutingCapture(nn.Module):
    """Persistent per-layer buffers of the step's routing (see the module doc).

    One pair of buffers per row, not one [R, max_tokens, ...] tensor: a compiled step writes a row's
    first T tokens in place only when the row is a tensor of its own. Into a slice of a shared tensor,
    Inductor rewrote the whole tensor (R x max_tokens x E values, every layer's write fused into full
    passes) in every step that records (tests/unit/test_routing_capture.py checks the generated code).
    """

    def __init__(self, max_tokens: int, num_layers: int, num_experts: int, top_k: int, enabled: bool = True,
                 layers: tuple[int, ...] | None = None):
        super().__init__()
        self.enabled = enabled
        self.step_records = False  # does a request of this step want its routing? (set by the worker per step)
        self.recording = True  # off while the plain variant of the model runs or is traced (idle_steps.py)
        self.layers = tuple(range(num_layers)) if layers is None else tuple(layers)  # row -> decoder layer
        self.num_experts, self.top_k = num_experts, top_k
        tokens = max_tokens if enabled else 0
        self.rows = nn.ModuleList(_Row(tokens, num_experts, top_k) for _ in self.layers)

    def record(self, row: int, topk_ids: torch.Tensor, logits: torch.Tensor) -> None:
        """Keep one layer's decision of this step (topk_ids [T, k], logits [T, E])."""
        self.record_ids(row, topk_ids)
        self.record_logits(row, logits)

    def record_ids(self, row: int, topk_ids: torch.Tensor) -> None:
        if self.enabled and self.recording:
            self.rows[row].ids[:topk_ids.shape[0]].copy_(topk_ids)

    def record_logits(self, row: int, logits: torch.Tensor) -> None:
        if self.enabled and self.recording:
            self.rows[row].logits[:logits.shape[0]].copy_(logits)

    def step_ids(self, num_tokens: int) -> torch.Tensor:
        """The step's first num_tokens ids of every row, [R, T, k], copied (the next step overwrites them)."""
        return torch.stack([row.ids[:num_tokens] for row in self.rows]).cpu()

    def step_logits(self, num_tokens: int) -> torch.Tensor:
        """The step's first num_tokens raw logits of every row, [R, T, E] fp16, copied."""
        return torch.stack([row.logits[:num_tokens] for row in self.rows]).cpu()

    @contextlib.contextmanager
    def unrecorded(self):
        """Layers record nothing in this block (the plain variant of the model runs, or is traced)."""
        self.recording = False
        try:
            yield
        finally:
            self.recording = True


def _npy(array: np.ndarray) -> bytes:
    with io.BytesIO() as buffer:
        np.save(buffer, array, allow_pickle=False)
        return buffer.getvalue()


class CapturedRequests:
    """The capturing requests' rows, by position, until the API process takes them."""

    def __init__(self, capture: RoutingCapture, num_experts: int):
        self.capture, self.num_experts = capture, num_experts
        self._rows: dict[str, dict[str, object]] = {}  # request id -> flags, prompt start, {position: rows}

    def admit(self, request_id: str, flags: int, prompt_start: int) -> None:
        self._rows.setdefault(request_id, {"flags": flags, "start": prompt_start, "experts": {}, "logits": {}})

    def wants(self, request_id: str) -> bool:
        return request_id in self._rows

    def collect(self, spans: list[tuple[str, int, int]], positions: torch.Tensor) -> None:
        """Copy out this step's rows: spans are (request id, first token, end token) in the step."""
        ids = self.capture.step_ids(positions.shape[0]).numpy()  # [R, T, k]
        logits = None
        steps = positions.cpu().numpy()
        for request_id, start, end in spans:
            entry = self._rows[request_id]
            if entry["flags"] & CAPTURE_LOGITS and logits is None:
                logits = self.capture.step_logits(positions.shape[0]).numpy()  # [R, T, E]
            for offset, position in enumerate(steps[start:end], start=start):
                entry["experts"][int(position)] = ids[:, offset]
                if entry["flags"] & CAPTURE_LOGITS:
                    entry["logits"][int(position)] = logits[:, offset]

    def take(self, request_ids: list[str]) -> dict[str, tuple[bytes | None, bytes | None]]:
        """Encoded (experts, logits) of each request, forgotten afterwards."""
        taken = {}
        for request_id in request_ids:
            entry = self._rows.pop(request_id, None)
            if entry is None:
                continue
            positions = sorted(p for p in entry["experts"] if p >= entry["start"])
            dtype = np.uint8 if self.num_experts < 256 else np.uint16  # id E (a dropped slot) must fit too
            experts = np.stack([entry["experts"][p] for p in positions]).astype(dtype) if positions else \
                np.zeros((0, len(self.capture.layers), self.capture.top_k), dtype=dtype)
            logits = None
            if entry["flags"] & CAPTURE_LOGITS:
                logits = _npy(np.stack([entry["logits"][p] for p in positions]).astype(np.float16)) if positions \
                    else _npy(np.zeros((0, len(self.capture.layers), self.num_experts), np.float16))
            taken[request_id] = (_npy(experts) if entry["flags"] & CAPTURE_EXPERTS else None, logits)
        return taken

    def prune(self, live) -> None:
        for request_id in [r for r in self._rows if r not in live]:
            del self._rows[request_id]
