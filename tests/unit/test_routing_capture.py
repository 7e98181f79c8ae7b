"""CapturedRequests keeps each step's rows by (request, position), whatever later steps write."""

from __future__ import annotations

import io
import re

import numpy as np
import torch

from unipool_serve.model_executor.routing_capture import CAPTURE_EXPERTS, CAPTURE_LOGITS, CapturedRequests, RoutingCapture

LAYERS, EXPERTS, TOP_K = 2, 8, 2


def _step(capture: RoutingCapture, ids: torch.Tensor) -> None:
    """One forward: every layer routes the step's tokens to `ids` [T, k] (+ the layer), logits = ids' sum."""
    for layer in range(LAYERS):
        chosen = (ids + layer) % EXPERTS
        capture.record(layer, chosen.to(torch.int32), chosen.sum(-1, keepdim=True).expand(-1, EXPERTS).half())


def _load(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False)


def test_rows_survive_later_steps_and_stay_with_their_request():
    capture = RoutingCapture(max_tokens=16, num_layers=LAYERS, num_experts=EXPERTS, top_k=TOP_K)
    requests = CapturedRequests(capture, EXPERTS)
    requests.admit("a", CAPTURE_EXPERTS | CAPTURE_LOGITS, 0)
    requests.admit("b", CAPTURE_EXPERTS, 0)
    # step 1: a's prompt (positions 0-2); step 2: b's prompt then a's decode; step 3: decodes of b, a
    steps = [([("a", 0, 3)], [0, 1, 2], [[0, 1], [1, 2], [2, 3]]),
             ([("b", 0, 2), ("a", 2, 3)], [0, 1, 3], [[4, 5], [5, 6], [6, 7]]),
             ([("b", 0, 1), ("a", 1, 2)], [2, 4], [[7, 0], [3, 4]])]
    for spans, positions, ids in steps:
        _step(capture, torch.tensor(ids))
        requests.collect(spans, torch.tensor(positions))
    taken = requests.take(["a", "b"])
    experts_a, logits_a = (_load(blob) for blob in taken["a"])
    want_a = np.array([[0, 1], [1, 2], [2, 3], [6, 7], [3, 4]])
    assert experts_a.shape == (5, LAYERS, TOP_K) and experts_a.dtype == np.uint8
    for layer in range(LAYERS):
        assert np.array_equal(experts_a[:, layer], (want_a + layer) % EXPERTS)
        assert np.array_equal(logits_a[:, layer, 0], ((want_a + layer) % EXPERTS).sum(-1))
    experts_b, logits_b = _load(taken["b"][0]), taken["b"][1]
    assert np.array_equal(experts_b[:, 0], [[4, 5], [5, 6], [7, 0]]) and logits_b is None
    assert requests.take(["a"]) == {}  # taken once, then forgotten


MAX_TOKENS = 4099  # a size no other dimension here has, to find it in the generated code


def _full_buffer_loops(record, num_rows: int) -> int:
    """How many loops of the compiled (Inductor, CPU) code of a step that records `num_rows` layers run over
    all MAX_TOKENS tokens of a buffer: a write into the step's first T tokens needs none."""
    from torch._inductor.utils import run_and_get_code

    def step(x):
        for row in range(num_rows):
            x = x * 2
            record(row, x.to(torch.int32)[:, :TOP_K], x.half())
        return x

    compiled = torch.compile(step, dynamic=True, fullgraph=True)
    torch._dynamo.mark_dynamic(x := torch.ones(5, EXPERTS), 0)
    _, code = run_and_get_code(compiled, x)
    return sum(len(re.findall(rf"<static_cast<int64_t>\({MAX_TOKENS}L\)", c)) for c in code)


def test_a_compiled_step_writes_only_its_own_tokens_into_the_capture_buffers():
    torch._dynamo.reset()
    capture = RoutingCapture(MAX_TOKENS, LAYERS, EXPERTS, TOP_K)
    assert _full_buffer_loops(capture.record, LAYERS) == 0
    # the layout this replaced, one [R, max_tokens, E] buffer: its slice writes became passes over all of it
    shared = torch.nn.Module()
    shared.register_buffer("logits", torch.zeros(LAYERS, MAX_TOKENS, EXPERTS, dtype=torch.float16))

    def record_shared(row, ids, logits):
        shared.logits[row, :logits.shape[0]].copy_(logits)

    torch._dynamo.reset()
    assert _full_buffer_loops(record_shared, LAYERS) > 0
