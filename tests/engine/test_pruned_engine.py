"""A vanilla per-layer MoE pruned to half its experts by `unipool-convert prune` (usage from a
calibration run) serves through vLLM like its reference model, with half the pool bytes."""

import json

import pytest

from engine_checks import (check_param_bytes, compare_with_reference, generate, pool_report, prompts,
                           reference_model, start_engine, stop_engine)

pytestmark = pytest.mark.engine
LAYOUT = dict(num_hidden_layers=4, layers_per_pool=1, num_experts=8, num_experts_per_tok=2, router_type="softmax",
              norm_topk_prob=True, expert_intermediate_size=64)


@pytest.fixture(scope="module")
def pruned(tiny_model_factory, tmp_path_factory):
    from unipool_serve.tools.convert import cli

    model = tiny_model_factory("prune_source", seed=6, **LAYOUT)
    work = tmp_path_factory.mktemp("prune")
    calibration = work / "calibration.jsonl"
    calibration.write_text("\n".join(json.dumps({"prompt": p}) for p in
                                     ("def add(a, b):\n    return a + b", "The quick brown fox jumps over the dog.",
                                      "import torch\nx = torch.zeros(4, 8)", "Hello world! Numbers 0 1 2 3")))
    assert cli.main(["prune", str(model), str(work / "pruned"), "--keep-fraction", "0.5",
                     "--usage", str(calibration)]) == 0
    return work / "pruned"


@pytest.fixture(scope="module")
def llm(pruned):
    engine = start_engine(pruned)
    yield engine
    stop_engine(engine)


def test_pruned_model_serves_like_its_reference_with_half_the_pool(llm, pruned):
    from unipool_serve.model_executor.config import UniPoolConfig

    config = UniPoolConfig.from_pretrained(str(pruned))
    assert config.num_experts == 4 and config.num_pools == 4
    ids = prompts(vocab=config.vocab_size)
    print(compare_with_reference(generate(llm, ids), ids, reference_model(pruned)))
    check_param_bytes(pool_report(llm)[0], config, dtype_bytes=4, padded_width=64)
