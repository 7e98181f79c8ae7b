"""Grouped pools (2 pools over 4 layers) + softmax top-2 renormalised, cpu_fused_moe backend."""

import pytest

from engine_checks import (
    check_param_bytes, compare_with_reference, generate, pool_report, prompts, reference_model, start_engine,
    stop_engine,
)

pytestmark = pytest.mark.engine

LAYOUT = dict(num_hidden_layers=4, layers_per_pool=2, layers_per_router=1, router_type="softmax",
              num_experts_per_tok=2, norm_topk_prob=True, num_experts=8, expert_intermediate_size=64)
SEED = 0


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return tiny_model_factory("grouped_softmax_top2", seed=SEED, **LAYOUT)


@pytest.fixture(scope="module")
def llm(model_dir):
    engine = start_engine(model_dir)
    yield engine
    stop_engine(engine)


def test_matches_reference(llm, model_dir):
    ids = prompts()
    print(compare_with_reference(generate(llm, ids), ids, reference_model(model_dir)))


def test_each_pool_resident_once(llm, model_dir):
    from unipool_serve.model_executor.config import UniPoolConfig

    (report,) = pool_report(llm)
    layers = report["layers"]
    assert [l["pool"] for l in layers] == [0, 0, 1, 1]
    assert [l["router"] for l in layers] == [0, 1, 2, 3]
    assert layers[0]["gate_up_ptr"] == layers[1]["gate_up_ptr"] != layers[2]["gate_up_ptr"] == layers[3]["gate_up_ptr"]
    assert layers[0]["down_ptr"] == layers[1]["down_ptr"] != layers[2]["down_ptr"] == layers[3]["down_ptr"]
    assert len({l["router_ptr"] for l in layers}) == 4
    assert [p["padded_width"] for p in report["pools"]] == [64, 64]
    check_param_bytes(report, UniPoolConfig.from_pretrained(str(model_dir)), 4, padded_width=64)
