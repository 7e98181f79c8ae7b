"""Vanilla per-layer pools + sigmoid top-2 + tied embeddings, on the torch MoE backend.

UNIPOOL_MOE_BACKEND=torch is set for this module's engine only (the spawned
workers inherit it), so the reference fallback path is checked end to end too.
"""

import pytest

from engine_checks import (
    check_param_bytes, compare_with_reference, env, generate, pool_report, prompts, reference_model,
    start_engine, stop_engine,
)

pytestmark = pytest.mark.engine

LAYOUT = dict(num_hidden_layers=4, layers_per_pool=1, layers_per_router=1, router_type="sigmoid",
              num_experts_per_tok=2, norm_topk_prob=False, num_experts=4, expert_intermediate_size=96,
              tie_word_embeddings=True)
SEED = 0


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return tiny_model_factory("vanilla_sigmoid_tied", seed=SEED, **LAYOUT)


@pytest.fixture(scope="module")
def llm(model_dir):
    with env(UNIPOOL_MOE_BACKEND="torch"):
        engine = start_engine(model_dir)
    yield engine
    stop_engine(engine)


def test_matches_reference(llm, model_dir):
    ids = prompts()
    print(compare_with_reference(generate(llm, ids), ids, reference_model(model_dir)))


def test_one_pool_per_layer_on_torch_backend(llm, model_dir):
    from unipool_serve.model_executor.config import UniPoolConfig

    (report,) = pool_report(llm)
    assert report["backend"] == "TorchBackend"
    layers = report["layers"]
    assert [l["pool"] for l in layers] == [0, 1, 2, 3]
    assert len({l["gate_up_ptr"] for l in layers}) == 4
    assert all(p["packed_by"] == "torch" and p["padded_width"] == 96 for p in report["pools"])
    sizes = report["param_sizes"]  # tied: the head is the embedding's storage
    assert sizes["lm_head.weight"][0] == sizes["model.embed_tokens.weight"][0]
    check_param_bytes(report, UniPoolConfig.from_pretrained(str(model_dir)), 4, padded_width=96)
