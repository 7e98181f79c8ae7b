"""Per-request steering of vLLM's own MoE families (steering/families.py) inside the vLLM engine.

For each architecture one engine with the steering worker (module-scoped, one at a time), on
a tiny random checkpoint written with transformers' own classes (demo/tiny_families.py).
Checked against transformers' own model steered the same way (model_executor/reference/family_steering.py), fp32:
greedy tokens and prompt logprobs, unsteered and under three profiles in one mixed batch,
which also equals solo runs; excluded experts never routed and included ones always (routing
counts); a routed budget of zero where the model has shared experts. Two architectures (one
gate in the model's MoE block, one inside FusedMoE's runner with grouped top-k) are also
compared with an engine WITHOUT the steering worker, token for token.

DeepSeek runs as the non-MLA variant (qk_nope/qk_rope dims 0: vLLM's plain multi-head
DeepseekAttention) with VLLM_MLA_DISABLE=1: transformers 5.19's DeepSeek configs reject
kv_lora_rank=None, and vLLM 0.32's CPU MLA path needs head dim 576 (docs/steering-vllm-models.md).
"""

import pytest
import torch

from unipool_serve.model_executor.reference import family_steering as family_reference
from engine_checks import LOGPROB_TOL, env, prompts, start_engine, stop_engine
from unipool_serve.demo.tiny_families import TINY_FAMILIES, load_reference, write_family_model
from unipool_serve.model_executor.steering.offline import OfflineSteering
from unipool_serve.model_executor.steering.profile import SteeringProfile
from unipool_serve.model_executor.steering.shape import SteerableModel

pytestmark = pytest.mark.engine

WORKER = "unipool_serve.model_executor.steering.worker.SteeringWorker"
TOKENS = 12
PLAIN_CHECKED = ("MixtralForCausalLM", "DeepseekV3ForCausalLM")
BATCH_NAMES = [None, "bias", "exclude", "include", "bias", None, "include", "exclude"]


# vLLM 0.32's CPU build gives the tiny Phi-MoE the same next-token distribution at every position,
# with or without the steering worker (transformers' model does not): its hook and routing are
# covered by tests/unit/test_family_steering.py instead (docs/steering-vllm-models.md).
ENGINE_FAMILIES = [a for a in TINY_FAMILIES if a != "PhiMoEForCausalLM"]
# Each engine costs ~45-90 s to start on 2 cores, so CI runs one family per seam and router
# kind; OLMoE (a gate in the model's MoE block, softmax: as Mixtral) and DeepSeek V1 (a gate
# inside FusedMoE, grouped selection: as DeepSeek V3) run with --all-families.
CI_FAMILIES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "DeepseekV3ForCausalLM",
               "GptOssForCausalLM")


@pytest.fixture(scope="module", params=ENGINE_FAMILIES)
def family(request, tmp_path_factory):
    arch = request.param
    if arch not in CI_FAMILIES and not request.config.getoption("--all-families"):
        pytest.skip(f"{arch}: run with --all-families (CI runs {', '.join(CI_FAMILIES)})")
    folder = write_family_model(tmp_path_factory.mktemp(arch), arch, seed=7)
    return arch, folder, SteerableModel.from_folder(folder)


def _profiles(shape: SteerableModel) -> dict[str, SteeringProfile]:
    L, E = shape.num_layers, shape.num_experts
    moe = [l for l in range(L) if l not in shape.dense_layers]
    gen = torch.Generator().manual_seed(0)
    bias = torch.zeros(L, E)
    bias[moe] = torch.randn(len(moe), E, generator=gen) * 2
    include_bias = torch.zeros(L, E)
    include_bias[moe] = torch.randn(len(moe), E, generator=gen)
    out = {
        "bias": SteeringProfile.for_config(shape, name="bias", bias=bias, alpha=1.5),
        "exclude": SteeringProfile.for_config(shape, name="exclude", exclude={l: [0, 1] for l in moe}),
        "include": SteeringProfile.for_config(shape, name="include", include={l: [E - 1] for l in moe},
                                              bias=include_bias),
    }
    if shape.shared_experts:
        out["shared-only"] = SteeringProfile.for_config(shape, name="shared-only", expert_budget={"top_k": 0})
    return out


def _env(arch: str):
    return env(VLLM_MLA_DISABLE=1) if arch.startswith("Deepseek") else env()


@pytest.fixture(scope="module")
def plain_tokens(family):
    """Greedy tokens from an engine WITHOUT the steering worker (two architectures only: CI time)."""
    arch, folder, _ = family
    if arch not in PLAIN_CHECKED:
        return None
    with _env(arch):
        llm = start_engine(folder)
        try:
            return [list(o.outputs[0].token_ids) for o in _generate(llm, prompts(seed=21), None)]
        finally:
            stop_engine(llm)


@pytest.fixture(scope="module")
def llm(family, plain_tokens):  # plain_tokens first: never two engines at once
    arch, folder, shape = family
    with _env(arch):
        engine = start_engine(folder, worker_cls=WORKER)
    engine.unipool_profiles = _profiles(shape)
    engine.unipool_steering = OfflineSteering(engine)
    for profile in engine.unipool_profiles.values():
        engine.unipool_steering.add(profile)
    yield engine
    stop_engine(engine)


@pytest.fixture(scope="module")
def reference(family):
    return load_reference(family[1])


def _generate(llm, prompt_ids, names):
    from vllm import SamplingParams

    steering = getattr(llm, "unipool_steering", None)
    names = names or [None] * len(prompt_ids)
    params = [SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True, logprobs=1, prompt_logprobs=1,
                             extra_args=steering.extra_args(n) if n else None) for n in names]
    return llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)


def _assert_reference_agrees(ref, shape, out, prompt, profile):
    """Prompt logprobs and teacher-forced greedy tokens equal transformers' model under `profile`."""
    tokens = list(out.outputs[0].token_ids)
    budget = (profile.expert_budget or {}).get("top_k") if profile is not None else None
    rows = ((profile.bias_rows(), profile.mask_rows(), 0.0 if budget == 0 else 1.0) if profile is not None else
            (torch.zeros(shape.num_layers, shape.num_experts), torch.zeros(shape.num_layers, shape.num_experts,
                                                                           dtype=torch.int8), 1.0))
    with family_reference.steered(ref, shape.router_kind, *rows):
        lp = family_reference.logprobs(ref, prompt + tokens)
    for i in range(1, len(prompt)):
        diff = abs(out.prompt_logprobs[i][prompt[i]].logprob - lp[i - 1, prompt[i]].item())
        assert diff <= LOGPROB_TOL, f"prompt logprob {i} differs by {diff:.2e}"
    unclear = 0
    for j, token in enumerate(tokens):
        top = lp[len(prompt) - 1 + j].topk(2)
        if (top.values[0] - top.values[1]).item() <= LOGPROB_TOL:
            unclear += 1
            continue
        assert token == int(top.indices[0]), f"token {j}: engine {token}, reference {int(top.indices[0])}"
    assert unclear <= 0.25 * len(tokens)


def _counts(llm) -> torch.Tensor:
    return torch.tensor(llm.collective_rpc("unipool_routing_stats")[0])  # [L, E]


def test_unsteered_equals_plain_vllm_and_transformers(llm, family, plain_tokens, reference):
    arch, _, shape = family
    ids = prompts(seed=21)
    outs = _generate(llm, ids, None)
    if plain_tokens is not None:
        assert [list(o.outputs[0].token_ids) for o in outs] == plain_tokens
    for out, p in zip(outs, ids):
        _assert_reference_agrees(reference, shape, out, p, None)


def test_mixed_batch_equals_solo_runs_and_transformers(llm, family, reference):
    _, _, shape = family
    profiles = llm.unipool_profiles
    ids = prompts(seed=22, lengths=(5, 17, 9, 30, 12, 21, 7, 14))
    batch = _generate(llm, ids, BATCH_NAMES)
    for p, name, out in zip(ids, BATCH_NAMES, batch):
        _assert_reference_agrees(reference, shape, out, p, profiles[name] if name else None)
        assert list(_generate(llm, [p], [name])[0].outputs[0].token_ids) == list(out.outputs[0].token_ids)
    unsteered = _generate(llm, ids, None)
    changed = sum(list(a.outputs[0].token_ids) != list(b.outputs[0].token_ids)
                  for a, b, name in zip(batch, unsteered, BATCH_NAMES) if name)
    assert changed >= 3  # the profiles really change these models' outputs


def test_excluded_never_routed_included_always(llm, family):
    _, _, shape = family
    ids = prompts(seed=23, lengths=(11, 19))
    computed = sum(len(p) + TOKENS - 1 for p in ids)
    moe = [l for l in range(shape.num_layers) if l not in shape.dense_layers]
    before = _counts(llm)
    _generate(llm, ids, ["exclude", "exclude"])
    delta = _counts(llm) - before
    assert (delta[moe][:, [0, 1]] == 0).all()
    assert (delta[moe].sum(1) == computed * shape.top_k).all() and (delta[list(shape.dense_layers)] == 0).all()
    before = _counts(llm)
    _generate(llm, ids, ["include", "include"])
    assert ((_counts(llm) - before)[moe][:, shape.num_experts - 1] == computed).all()


def test_shared_experts_only_request(llm, family, reference):
    _, _, shape = family
    if not shape.shared_experts:
        pytest.skip(f"{shape.architecture} has no shared experts")
    ids = prompts(seed=24, lengths=(9, 15))
    batch = _generate(llm, ids, ["shared-only", None])
    _assert_reference_agrees(reference, shape, batch[0], ids[0], llm.unipool_profiles["shared-only"])
    _assert_reference_agrees(reference, shape, batch[1], ids[1], None)  # its neighbour is untouched
    assert batch[0].outputs[0].token_ids != _generate(llm, [ids[0]], None)[0].outputs[0].token_ids
