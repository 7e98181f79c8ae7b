"""Tensor parallel 2 on the CPU build: each pool sharded on the expert width F.

F = 48 splits into 24 per rank, padded to 32 for cpu_fused_moe. The two CPU ranks
need VLLM_CPU_OMP_THREADS_BIND="0|1" (one core each; the default asks for two NUMA nodes).
"""

import pytest

from engine_checks import (
    check_param_bytes, compare_with_reference, env, generate, pool_report, prompts, reference_model,
    start_engine, stop_engine,
)
from test_global_pool_engine import LAYOUT, SEED

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return tiny_model_factory("global_pathmoe_shared", seed=SEED, **LAYOUT)


@pytest.fixture(scope="module")
def llm(model_dir):
    with env(VLLM_CPU_OMP_THREADS_BIND="0|1"):
        engine = start_engine(model_dir, tensor_parallel_size=2)
    yield engine
    stop_engine(engine)


def test_tp2_matches_reference(llm, model_dir):
    ids = prompts()
    print(compare_with_reference(generate(llm, ids), ids, reference_model(model_dir)))


def test_pool_sharded_on_expert_width(llm, model_dir):
    from unipool_serve.model_executor.config import UniPoolConfig

    reports = pool_report(llm)
    assert len(reports) == 2
    for report in reports:
        (pool,) = report["pools"]
        assert pool["local_width"] == 24 and pool["padded_width"] == 32
        assert pool["gate_up_shape"] == (8, 64, 128) and pool["down_shape"] == (8, 128, 32)
        assert len({l["gate_up_ptr"] for l in report["layers"]}) == 1
        check_param_bytes(report, UniPoolConfig.from_pretrained(str(model_dir)), 4, padded_width=32, tp=2)
