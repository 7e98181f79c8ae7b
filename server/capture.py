"""Per-request results in responses: captured routing (`routed_experts`, `router_logits`) and probe
scores (`probe_scores`) per choice.

A request to /v1/completions or /v1/chat/completions with `"return_routed_experts": true`
and/or `"return_router_logits": true` (one prompt per request) gets, in every choice:

  routed_experts  base64 of an `np.save`d array [tokens, layers, top_k] (vLLM 0.32's field
                  and encoding: uint8 when the pool has fewer than 256 experts, else uint16),
                  the experts each token was routed to, steering and expert budget applied
                  (a slot dropped by a budget holds the pool size E);
  router_logits   base64 of an `np.save`d float16 array [tokens, layers, experts], the raw
                  router logits (before steering);
  routed_experts_layers  the decoder layer index of each `layers` row: every layer of a UniPool
                  model; the MoE layers of one of vLLM's families (layers without experts have
                  no row, unlike vLLM's own field, which keeps them as rows of zeros);
  probe_scores    {probe name: {"score", "fired"[, "output_score", "output_fired"]}} for a
                  probed request (docs/probes.md), on any route whose response has choices in
                  this shape; on the other routes the probes still run (and gate), and the
                  scores reach the metrics only.

`tokens` are the positions the model computed, the prompt and the output but the last token
(which is never fed back), from `routed_experts_prompt_start` on (vLLM's request field). A
pool model reports pool expert ids. A family's ids are vLLM's slot order (its CPU router's
top-k is unsorted): sort a row if order matters.

Non-streaming: the fields are added to each choice of the JSON body. Streaming: the chunk
that carries a choice's `finish_reason` carries them; it is held back and sent once the
request has finished, just before the usage chunk or `data: [DONE]`. The worker keeps the
rows (model_executor/routing_capture.py); this module takes them from the engine when the
response ends and writes them in. Should the engine not hand them over within
TAKE_TIMEOUT_S (a stuck or dying engine), each choice gets `routing_capture_error` instead and
the response still ends: a capture never holds a response open.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Awaitable, Callable

from .enforcement import RequestContext

# engine request ids -> ({engine id: {"experts", "logits" (.npy bytes), "probes" ({row: scores})}},
# the decoder layer of each captured row)
TakeFn = Callable[[list[str]], Awaitable[tuple[dict[str, dict], list[int]]]]
ProbeScoreFn = Callable[[str, dict], None]  # (probe name, its scores of one request): metrics
TAKE_TIMEOUT_S = 30.0  # the engine answers in milliseconds; longer means it is stuck or gone
logger = logging.getLogger(__name__)


def _fields(taken: dict | None, layers: list[int], probe_names: dict[int, str]) -> dict:
    taken = taken or {}
    out = {}
    if taken.get("experts") is not None:
        out["routed_experts"] = base64.b64encode(taken["experts"]).decode("ascii")
    if taken.get("logits") is not None:
        out["router_logits"] = base64.b64encode(taken["logits"]).decode("ascii")
    if out:
        out["routed_experts_layers"] = layers
    if taken.get("probes") is not None:
        out["probe_scores"] = {probe_names.get(int(row), str(row)): scores for row, scores in taken["probes"].items()}
    return out


class CaptureResponse:
    """Wraps one response's ASGI `send` and writes the captured routing into its choices."""

    def __init__(self, send, ctx: RequestContext, take: TakeFn, on_probe_scores: ProbeScoreFn | None = None):
        self.send, self.ctx, self.take, self.on_probe_scores = send, ctx, take, on_probe_scores
        self.start: dict | None = None
        self.mode = None  # "json", "sse" or "pass"
        self.chunks: list[bytes] = []
        self.pending = b""  # an SSE event not complete yet
        self.held: list[dict] = []  # SSE chunks carrying a finish_reason
        self.taken: dict[int, dict] | None = None  # choice index -> fields

    async def _by_choice(self) -> dict[int, dict]:
        if self.taken is None:
            by_choice = {index: engine_id for (_, index), engine_id in self.ctx.captured.items()}
            try:
                taken, layers = (await asyncio.wait_for(self.take(list(by_choice.values())), TAKE_TIMEOUT_S)
                                 if by_choice else ({}, []))
            except Exception as error:  # noqa: BLE001 - the text is already generated: answer it without capture
                logger.warning("routing capture not taken from the engine (%s): %r", type(error).__name__, error)
                reason = "the engine did not hand over this request's routing capture; the text is complete"
                self.taken = {index: {"routing_capture_error": reason} for index in by_choice}
                return self.taken
            self.taken = {index: _fields(taken.get(engine_id), layers, self.ctx.probe_names)
                          for index, engine_id in by_choice.items()}
            if self.on_probe_scores is not None:
                for fields in self.taken.values():
                    for name, scores in fields.get("probe_scores", {}).items():
                        self.on_probe_scores(name, scores)
        return self.taken

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers") or [])
            content_type = headers.get(b"content-type", b"").decode("latin-1")
            self.mode = "pass" if message["status"] != 200 else "sse" if "event-stream" in content_type else "json"
            if self.mode == "json":
                self.start = message  # sent with the final length once the body is complete
                return
            return await self.send(message)
        if message["type"] != "http.response.body" or self.mode == "pass":
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                await self._by_choice()  # no choices to write into: the results still leave the engine
            return await self.send(message)
        if self.mode == "json":
            return await self._json(message)
        return await self._sse(message)

    async def _json(self, message) -> None:
        self.chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = json.loads(b"".join(self.chunks))
        fields = await self._by_choice()
        for choice in body.get("choices", []):
            choice.update(fields.get(choice.get("index", 0), {}))
        payload = json.dumps(body).encode()
        headers = [(k, v) for k, v in self.start.get("headers", []) if k.lower() != b"content-length"]
        await self.send({**self.start, "headers": headers + [(b"content-length", str(len(payload)).encode())]})
        await self.send({"type": "http.response.body", "body": payload})

    async def _sse(self, message) -> None:
        self.pending += message.get("body", b"")
        *events, self.pending = self.pending.split(b"\n\n")
        out = []
        for event in events:
            data = event[len(b"data: "):] if event.startswith(b"data: ") else None
            if data is None or data.strip() == b"[DONE]":
                out += await self._release() + [event]
                continue
            chunk = json.loads(data)
            if any(c.get("finish_reason") is not None for c in chunk.get("choices", [])):
                self.held.append(chunk)  # its choice's last chunk: sent once the routing is known
            elif self.held and not chunk.get("choices"):  # the usage chunk: the request has finished
                out += await self._release() + [event]
            else:
                out.append(event)
        if out or not message.get("more_body", False):
            tail = b"" if message.get("more_body", False) else self.pending + await self._released_tail()
            body = b"".join(e + b"\n\n" for e in out) + tail
            await self.send({"type": "http.response.body", "body": body, "more_body": message.get("more_body", False)})

    async def _release(self) -> list[bytes]:
        if not self.held:
            return []
        fields = await self._by_choice()
        events = []
        for chunk in self.held:
            for choice in chunk.get("choices", []):
                if choice.get("finish_reason") is not None:
                    choice.update(fields.get(choice.get("index", 0), {}))
            events.append(b"data: " + json.dumps(chunk).encode())
        self.held = []
        return events

    async def _released_tail(self) -> bytes:
        return b"".join(e + b"\n\n" for e in await self._release())
