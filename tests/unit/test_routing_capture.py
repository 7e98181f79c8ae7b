"""CapturedRequests keeps each step's rows by (request, position), whatever later steps write."""

from __future__ import annotations

import io

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
