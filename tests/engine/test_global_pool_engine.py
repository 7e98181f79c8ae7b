"""One global pool + PathMoE router blocks + shared expert + NormRouter top-1, cpu_fused_moe backend.

F = 48 is not a multiple of 32, so the prepacked pool is padded to 64 (checked in bytes).
"""

import pytest

from engine_checks import (
    GEN_TOKENS, check_param_bytes, compare_with_reference, generate, pool_report, prompts,
    reference_model, start_engine, stop_engine,
)

pytestmark = pytest.mark.engine

LAYOUT = dict(num_hidden_layers=4, layers_per_pool=4, layers_per_router=2, router_type="norm",
              num_experts_per_tok=1, num_experts=8, expert_intermediate_size=48,
              shared_expert_intermediate_size=64)
SEED = 3


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return tiny_model_factory("global_pathmoe_shared", seed=SEED, **LAYOUT)


@pytest.fixture(scope="module")
def llm(model_dir):
    engine = start_engine(model_dir)
    yield engine
    stop_engine(engine)


def test_matches_reference(llm, model_dir):
    ids = prompts()
    result = compare_with_reference(generate(llm, ids), ids, reference_model(model_dir))
    print(result)


def test_batching_invariance(llm):
    ids = prompts(seed=7, lengths=(5, 17, 40, 9, 23))
    together = [o.outputs[0].token_ids for o in generate(llm, ids, prompt_logprobs=None)]
    alone = [generate(llm, [p], prompt_logprobs=None)[0].outputs[0].token_ids for p in ids]
    assert [list(t) for t in together] == [list(t) for t in alone]
    assert all(len(t) == GEN_TOKENS for t in together)


def test_pool_resident_once(llm, model_dir):
    from unipool_serve.model_executor.config import UniPoolConfig

    config = UniPoolConfig.from_pretrained(str(model_dir))
    (report,) = pool_report(llm)
    assert report["backend"] == "CpuBackend"
    assert len(report["pools"]) == 1
    pool = report["pools"][0]
    assert pool["packed_by"] == "cpu:vec"
    assert pool["padded_width"] == 64 and pool["local_width"] == 48
    assert pool["gate_up_shape"] == (8, 128, 128) and pool["down_shape"] == (8, 128, 64)
    layers = report["layers"]
    assert [l["pool"] for l in layers] == [0, 0, 0, 0]
    assert len({l["gate_up_ptr"] for l in layers}) == 1 and len({l["down_ptr"] for l in layers}) == 1
    # PathMoE: layers 0,1 share router 0, layers 2,3 router 1
    assert [l["router"] for l in layers] == [0, 0, 1, 1]
    assert layers[0]["router_ptr"] == layers[1]["router_ptr"] != layers[2]["router_ptr"] == layers[3]["router_ptr"]
    # the pool appears under exactly one name, even counting duplicates
    names = report["param_names"]
    assert sum("gate_up_proj" in n and "pools" in n for n in names) == 1
    assert not any(n.startswith("model.layers.") and ".pool" in n for n in names)
    check_param_bytes(report, config, 4, padded_width=64)


def test_steering_seam_exists_and_stays_zero(llm):
    (report,) = pool_report(llm)
    steering = report["steering"]
    assert steering["index"]["dtype"] == "torch.int32" and steering["index"]["shape"] == (256,)
    assert steering["bias_table"]["shape"] == (17, 4, 8) and steering["bias_table"]["dtype"] == "torch.float32"
    assert steering["mask_table"]["shape"] == (17, 4, 8) and steering["mask_table"]["dtype"] == "torch.int8"
    assert all(v["nonzero"] == 0 for v in steering.values())
