"""The compiled engine runs steps nobody steers or captures on its plain variant (steering/idle_steps.py):
no graph break, no host read inside the model, and each step on the variant its rows ask for (a budget:
the budgeted variant, the only one that reads back per layer).
Counted, never timed (what the seam costs in time: docs/benchmarks.md)."""

from __future__ import annotations

import io

import numpy as np
import pytest

import step_profiler
from engine_checks import env, start_engine, stop_engine

pytestmark = pytest.mark.engine
WORKER = "unipool_serve.model_executor.steering.worker.SteeringWorker"
TOKENS = 8
PROMPT = [5, 17, 33, 90, 121, 7]


def _profiled(llm, extra_args, cache_salt=None):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True, extra_args=extra_args)
    request = {"prompt_token_ids": PROMPT} | ({"cache_salt": cache_salt} if cache_salt else {})
    before = llm.collective_rpc(step_profiler.steps_each_way)[0]
    llm.collective_rpc(step_profiler.start)
    output = llm.generate([request], params, use_tqdm=False)[0]
    profile = llm.collective_rpc(step_profiler.stop)[0]
    after = llm.collective_rpc(step_profiler.steps_each_way)[0]
    return output, profile, {way: after[way] - before[way] for way in after}


def test_a_compiled_engine_runs_idle_steps_on_the_unsteered_variant(tiny_model_factory):
    from unipool_serve.model_executor.config import UniPoolConfig
    from unipool_serve.model_executor.steering import contract
    from unipool_serve.model_executor.steering.offline import OfflineSteering
    from unipool_serve.model_executor.steering.profile import SteeringProfile

    path = tiny_model_factory("idle-seam-model", seed=3, num_experts_per_tok=2)
    config = UniPoolConfig.from_pretrained(str(path))
    with env(VLLM_ALLOW_INSECURE_SERIALIZATION=1):
        llm = start_engine(path, worker_cls=WORKER, enforce_eager=False)
    try:
        steering = OfflineSteering(llm)
        steering.add(SteeringProfile.for_config(config, name="no-e0",
                                                exclude={l: [0] for l in range(config.num_hidden_layers)}))
        _, idle, idle_steps = _profiled(llm, None)
        _, steered, steered_steps = _profiled(llm, steering.extra_args("no-e0"), steering.cache_salt("no-e0"))
        # a budget alone reads the tables too, on the variant traced with budgets
        _, budgeted, budgeted_steps = _profiled(llm, steering.extra_args(None, budget=1),
                                                steering.cache_salt(None, budget=1))
        # a request whose routing is captured runs the model (its layers copy the routing out) ...
        captured, _, captured_steps = _profiled(llm, steering.extra_args(None, capture=contract.CAPTURE_EXPERTS))
        taken = llm.collective_rpc(step_profiler.take_captured_experts, args=(captured.request_id,))[0]
        # ... and reads no row of the steered requests before it: it is routed as an idle step is
        _, _, after_steered = _profiled(llm, steering.extra_args("no-e0"), steering.cache_salt("no-e0"))
        recaptured, _, _ = _profiled(llm, steering.extra_args(None, capture=contract.CAPTURE_EXPERTS))
        retaken = llm.collective_rpc(step_profiler.take_captured_experts, args=(recaptured.request_id,))[0]
        breaks = llm.collective_rpc(step_profiler.graph_breaks)[0]
    finally:
        stop_engine(llm)
    assert breaks == 0
    assert idle_steps == {"read": 0, "budgeted": 0, "unread": TOKENS}  # every step of an unsteered request: the variant
    assert steered_steps == {"read": TOKENS, "budgeted": 0, "unread": 0}
    assert budgeted_steps == {"read": 0, "budgeted": TOKENS, "unread": 0}
    assert captured_steps == {"read": TOKENS, "budgeted": 0, "unread": 0}
    experts = np.load(io.BytesIO(taken))
    assert experts.shape == (len(PROMPT) + TOKENS - 1, config.num_hidden_layers, config.num_experts_per_tok)
    assert after_steered == {"read": TOKENS, "budgeted": 0, "unread": 0}
    # no row of the steered request before it (which excludes expert 0) leaked into the captured request's steps
    np.testing.assert_array_equal(np.load(io.BytesIO(retaken)), experts)
    assert recaptured.outputs[0].token_ids == captured.outputs[0].token_ids
    assert idle["our_host_reads"] == []  # nothing of ours is read back per layer while nobody steers
    assert steered["our_host_reads"] == []  # nor in a steered step that holds no budget
    # the one read of ours: is a slot dropped? (unipool::cpu_pool_moe), only where a budget can drop one
    assert budgeted["our_host_reads"] and all("cpu_pool_moe" in read for read in budgeted["our_host_reads"])
