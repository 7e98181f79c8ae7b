"""The worker's two hooks, on stand-ins shaped like vLLM 0.32's V1 and V2 model runners.

V1 also runs for real in tests/engine; V2 cannot run on the CPU build, so this is where its
bookkeeping (rows by request index, the index filled in prepare_inputs) is checked.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from unipool_serve.model_executor.routing_capture import CapturedRequests, RoutingCapture
from unipool_serve.model_executor.steering import contract
from unipool_serve.model_executor.steering.table import SteeringTable
from unipool_serve.model_executor.steering.request_rows import RequestRows
from unipool_serve.model_executor.steering.worker import V1StepHook, V2StepHook

SECRET = b"w" * 32


def _rows() -> RequestRows:
    table = SteeringTable(max_tokens=16, num_layers=1, num_experts=4, max_profiles=3, top_k=2)
    table.set_row(2, {"bias": torch.zeros(1, 4), "mask": torch.zeros(1, 4)}, "d2")
    rows = RequestRows(table)
    rows.secret = SECRET
    return rows


def _params(slot=None, digest="d2", secret=SECRET):
    extra = None if slot is None else contract.steering_args(secret, "p", slot, digest)
    return SimpleNamespace(extra_args=extra)


def test_v1_hook_fills_the_index_from_each_requests_signed_row():
    rows = _rows()
    forwarded = []
    runner = SimpleNamespace(
        _model_forward=lambda **kw: forwarded.append(kw["input_ids"].shape[0]),
        requests={"a": SimpleNamespace(sampling_params=_params(2)), "b": SimpleNamespace(sampling_params=_params()),
                  "c": SimpleNamespace(sampling_params=_params(2, secret=b"forged"))},
        input_batch=SimpleNamespace(req_ids=["a", "b", "c"], num_reqs=3),
        query_start_loc=SimpleNamespace(np=np.array([0, 3, 4, 6])))
    V1StepHook(runner, rows)
    rows.table.index.fill_(9)
    runner._model_forward(input_ids=torch.zeros(8, dtype=torch.long))
    assert forwarded == [8]
    assert rows.table.index[:8].tolist() == [2, 2, 2, 0, 0, 0, 0, 0]  # forged row ignored, padding zeroed


def test_v1_hook_has_the_layers_record_routing_only_in_steps_holding_a_capturing_request():
    capture = RoutingCapture(max_tokens=16, num_layers=1, num_experts=4, top_k=2)
    rows = RequestRows(_rows().table, CapturedRequests(capture, 4))
    rows.secret = SECRET
    capturing = SimpleNamespace(extra_args=contract.steering_args(SECRET, None, 0, "", None, contract.CAPTURE_EXPERTS))
    runner = SimpleNamespace(
        _model_forward=lambda **kw: None, requests={"a": SimpleNamespace(sampling_params=_params()),
                                                    "cap": SimpleNamespace(sampling_params=capturing)},
        input_batch=SimpleNamespace(req_ids=["a"], num_reqs=1), query_start_loc=SimpleNamespace(np=np.array([0, 1])))
    V1StepHook(runner, rows, capture)
    runner._model_forward(input_ids=torch.zeros(1, dtype=torch.long))
    assert not capture.step_records and not rows.table.step_reads  # the plain variant: no copy, no read
    runner.input_batch = SimpleNamespace(req_ids=["a", "cap"], num_reqs=2)
    runner.query_start_loc = SimpleNamespace(np=np.array([0, 1, 2]))
    runner._model_forward(input_ids=torch.zeros(2, dtype=torch.long))
    assert capture.step_records  # the model runs: its layers copy the routing out
    runner.input_batch = SimpleNamespace(req_ids=["a"], num_reqs=1)
    runner.query_start_loc = SimpleNamespace(np=np.array([0, 1]))
    runner._model_forward(input_ids=torch.zeros(1, dtype=torch.long))
    assert not capture.step_records


def test_v2_hook_keeps_rows_by_request_index():
    rows = _rows()
    calls = []
    state = SimpleNamespace(add_request=lambda i, d: calls.append(("add", i)),
                            remove_request=lambda r: calls.append(("remove", r)),
                            prepare_inputs=lambda b, s: {"prepared": True})
    runner = SimpleNamespace(model_state=state, req_states=SimpleNamespace(req_id_to_index={"a": 5, "b": 1}))
    V2StepHook(runner, rows)
    state.add_request(5, SimpleNamespace(sampling_params=_params(2)))
    state.add_request(1, SimpleNamespace(sampling_params=_params()))
    batch = SimpleNamespace(idx_mapping_np=np.array([1, 5]), num_reqs=2, query_start_loc_np=np.array([0, 2, 5]),
                            num_tokens_after_padding=8)
    rows.table.index.fill_(9)
    assert state.prepare_inputs(batch, None) == {"prepared": True}
    assert rows.table.index[:8].tolist() == [0, 0, 2, 2, 2, 0, 0, 0]
    state.remove_request("a")
    assert not rows.known(5) and calls[-1] == ("remove", "a")
    rows.table.clear_row(2)  # rewritten since admission: never another profile's content
    state.add_request(5, SimpleNamespace(sampling_params=_params(2)))
    state.prepare_inputs(batch, None)
    assert not rows.table.step_reads  # no token has a row: the step runs the model that never reads the tables


def test_cuda_graphs_that_replay_a_whole_forward_give_way_to_piecewise_ones(monkeypatch):
    """A full CUDA graph would freeze the per-step choice of a compiled variant (steering/idle_steps.py)."""
    from vllm.config.compilation import CompilationConfig

    from unipool_serve.model_executor.steering.worker import keep_variants_choosable

    expected = {"FULL_AND_PIECEWISE": ("PIECEWISE", "FULL_AND_PIECEWISE -> PIECEWISE"),
                "FULL": ("NONE", "FULL -> NONE"), "FULL_DECODE_ONLY": ("NONE", "FULL_DECODE_ONLY -> NONE"),
                "PIECEWISE": ("PIECEWISE", None), "NONE": ("NONE", None)}
    def config(mode: str, v2: bool = False):
        return SimpleNamespace(compilation_config=CompilationConfig(cudagraph_mode=mode), use_v2_model_runner=v2)

    for mode, (after, change) in expected.items():
        vllm_config = config(mode)
        assert keep_variants_choosable(vllm_config) == change, mode
        assert vllm_config.compilation_config.cudagraph_mode.name == after, mode
    v2 = config("PIECEWISE", v2=True)  # V2 captures outside the warm-up that runs every variant
    assert keep_variants_choosable(v2) == "PIECEWISE -> NONE" and v2.compilation_config.cudagraph_mode.name == "NONE"
    monkeypatch.setenv("VLLM_USE_BREAKABLE_CUDAGRAPH", "1")  # breakable graphs capture the whole forward too
    breakable = config("PIECEWISE")
    assert keep_variants_choosable(breakable) == "PIECEWISE -> NONE"
