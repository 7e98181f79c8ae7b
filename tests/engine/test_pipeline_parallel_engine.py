"""Pipeline parallel 2 on the CPU build: each stage holds only the pools its layers use.

A global pool is replicated on both stages; grouped pools whose layers sit on one stage,
and plain per-layer pools, live on their stage only. Outputs equal the reference model in fp32; a steering profile
reaches both stages (its include holds in every layer); routing counts are merged across
stages the way the server's metrics merge them (elementwise max: a stage counts zero for
the layers it does not hold). The two ranks need VLLM_CPU_OMP_THREADS_BIND="0|1".
"""

import pytest
import torch

from engine_checks import (compare_with_reference, env, generate, pool_report, prompts, reference_model,
                           start_engine, stop_engine)

pytestmark = pytest.mark.engine
WORKER = "unipool_serve.model_executor.steering.worker.SteeringWorker"
BASE = dict(num_hidden_layers=4, num_experts=8, expert_intermediate_size=64, router_type="softmax",
            num_experts_per_tok=2, norm_topk_prob=True)
LAYOUTS = {
    "global": dict(BASE, layers_per_pool=4),  # one pool, needed by both stages
    "grouped": dict(BASE, layers_per_pool=2, layers_per_router=2),  # pool 0 on stage 0, pool 1 on stage 1
    "vanilla": dict(BASE, layers_per_pool=1, layers_per_router=1),  # plain per-layer MoE: 2 pools per stage
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def engine(request, tiny_model_factory):
    model_dir = tiny_model_factory(f"pp_{request.param}", seed=8, **LAYOUTS[request.param])
    with env(VLLM_CPU_OMP_THREADS_BIND="0|1"):
        llm = start_engine(model_dir, pipeline_parallel_size=2, worker_cls=WORKER,
                           distributed_executor_backend="mp")
    yield request.param, model_dir, llm
    stop_engine(llm)


def test_pp2_matches_reference(engine):
    _, model_dir, llm = engine
    ids = prompts()
    print(compare_with_reference(generate(llm, ids), ids, reference_model(model_dir)))


def test_each_stage_holds_the_pools_of_its_layers(engine):
    from unipool_serve.model_executor.config import UniPoolConfig

    layout, model_dir, llm = engine
    config = UniPoolConfig.from_pretrained(str(model_dir))
    reports = pool_report(llm)
    assert len(reports) == 2
    pool_bytes = config.num_experts * 3 * 64 * config.hidden_size * 4  # F 64 is already a multiple of 32
    for stage, report in enumerate(reports):
        stage_layers = [l["layer"] for l in report["layers"]]
        assert stage_layers == [2 * stage, 2 * stage + 1]
        pools = {config.layer_to_pool(l) for l in stage_layers}
        held = sum(b for n, (_, b, _, _) in report["param_sizes"].items() if n.startswith("model.pools."))
        assert held == len(pools) * pool_bytes  # the closed form: pools its layers use, nothing else
        assert len(report["pools"]) == len(pools)
    replicated = layout == "global"
    assert (len({r["pools"][0]["gate_up_shape"] for r in reports}) == 1) and replicated == (
        {config.layer_to_pool(l["layer"]) for l in reports[0]["layers"]}
        == {config.layer_to_pool(l["layer"]) for l in reports[1]["layers"]})


def test_steering_reaches_every_stage_and_counts_merge(engine):
    from vllm import SamplingParams

    from unipool_serve.model_executor.config import UniPoolConfig
    from unipool_serve.model_executor.steering.offline import OfflineSteering
    from unipool_serve.model_executor.steering.profile import SteeringProfile

    _, model_dir, llm = engine
    config = UniPoolConfig.from_pretrained(str(model_dir))
    steering = OfflineSteering(llm)
    steering.add(SteeringProfile.for_config(config, name="with-e3", include={l: [3] for l in range(4)}))

    def counts():
        per_rank = [torch.tensor(r) for r in llm.collective_rpc("unipool_routing_stats")]
        return torch.stack(per_rank).amax(0)  # [L, E]

    prompt = prompts(seed=21, lengths=(9,))[0]
    before = counts()
    llm.generate([{"prompt_token_ids": prompt, "cache_salt": steering.cache_salt("with-e3")}],
                 SamplingParams(max_tokens=6, ignore_eos=True, temperature=0, extra_args=steering.extra_args("with-e3")),
                 use_tqdm=False)
    delta = counts() - before
    computed = len(prompt) + 6 - 1
    assert (delta[:, 3] == computed).all()  # every layer, on both stages, includes expert 3
    assert (delta.sum(1) == computed * 2).all()
