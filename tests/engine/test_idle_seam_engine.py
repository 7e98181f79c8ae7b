"""The compiled engine runs steps nobody steers on its unsteered variant (steering/idle_steps.py):
no graph break, no host read inside the model, and each step on the variant its rows ask for.
Counted, never timed (what the seam costs in time: docs/benchmarks.md)."""

from __future__ import annotations

import pytest

import step_profiler
from engine_checks import env, start_engine, stop_engine

pytestmark = pytest.mark.engine
WORKER = "unipool_serve.model_executor.steering.worker.SteeringWorker"
TOKENS = 8


def _profiled(llm, steering, name):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True, extra_args=steering.extra_args(name))
    request = {"prompt_token_ids": [5, 17, 33, 90, 121, 7]} | ({"cache_salt": steering.cache_salt(name)} if name else {})
    before = llm.collective_rpc(step_profiler.steps_each_way)[0]
    llm.collective_rpc(step_profiler.start)
    tokens = list(llm.generate([request], params, use_tqdm=False)[0].outputs[0].token_ids)
    profile = llm.collective_rpc(step_profiler.stop)[0]
    after = llm.collective_rpc(step_profiler.steps_each_way)[0]
    return tokens, profile, {way: after[way] - before[way] for way in after}


def test_a_compiled_engine_runs_idle_steps_on_the_unsteered_variant(tiny_model_factory):
    from unipool_serve.model_executor.config import UniPoolConfig
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
        _, idle, idle_steps = _profiled(llm, steering, None)
        _, _, steered_steps = _profiled(llm, steering, "no-e0")
        _, budgeted, budgeted_steps = _profiled(llm, type("Budget", (), {  # a budget alone reads the tables too
            "extra_args": lambda self, name: steering.extra_args(None, budget=1),
            "cache_salt": lambda self, name: steering.cache_salt(None, budget=1)})(), "budget")
        breaks = llm.collective_rpc(step_profiler.graph_breaks)[0]
    finally:
        stop_engine(llm)
    assert breaks == 0
    assert idle_steps == {"read": 0, "unread": TOKENS}  # every step of an unsteered request: the variant
    assert steered_steps == {"read": TOKENS, "unread": 0} and budgeted_steps == {"read": TOKENS, "unread": 0}
    assert idle["our_host_reads"] == []  # nothing of ours is read back per layer while nobody steers
    # the one read of ours: is a slot dropped? (unipool::cpu_pool_moe), only where a budget can drop one
    assert budgeted["our_host_reads"] and all("cpu_pool_moe" in read for read in budgeted["our_host_reads"])
