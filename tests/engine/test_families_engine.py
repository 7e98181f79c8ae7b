"""Per-request steering of vLLM's own MoE families (steering/families.py) inside the vLLM engine.

For each architecture one engine with the steering worker (module-scoped, one at a time), on
a tiny random checkpoint written with transformers' own classes (demo/tiny_families.py).
Checked against transformers' own model steered the same way (model_executor/reference/family_steering.py), fp32:
greedy tokens and prompt logprobs, unsteered and under three profiles in one mixed batch,
which also equals solo runs; excluded experts never routed and included ones always (routing
counts); a routed budget of zero where the model has shared experts. Two architectures (one
gate in the model's MoE block, one inside FusedMoE's runner with grouped top-k) are also
compared with an engine WITHOUT the steering worker, token for token. Routing capture: the raw
router logits (fp16) and the experts used (steered, budgeted) of each MoE layer equal what
transformers' own routers compute under the same steering, in a mixed batch as solo, and capture
never changes a token.

DeepSeek runs as the non-MLA variant (qk_nope/qk_rope dims 0: vLLM's plain multi-head
DeepseekAttention) with VLLM_MLA_DISABLE=1: transformers 5.19's DeepSeek configs reject
kv_lora_rank=None, and vLLM 0.32's CPU MLA path needs head dim 576 (docs/steering-vllm-models.md).
"""

import io

import numpy as np
import pytest
import torch

from engine_checks import LOGPROB_TOL, env, prompts, start_engine, stop_engine
from unipool_serve.demo.tiny_families import TINY_FAMILIES, load_reference, write_family_model
from unipool_serve.model_executor.reference import family_steering as family_reference
from unipool_serve.model_executor.steering import contract
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


def _generate(llm, prompt_ids, names, budgets=None, capture=None):
    """Greedy outputs; per request a profile name, an expert budget and routing-capture flags (or None)."""
    from vllm import SamplingParams

    steering = getattr(llm, "unipool_steering", None)
    names = names or [None] * len(prompt_ids)
    budgets, capture = budgets or [None] * len(names), capture or [0] * len(names)
    params = [SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True, logprobs=1, prompt_logprobs=1,
                             extra_args=steering.extra_args(n, budget=b, capture=c) if n or b or c else None)
              for n, b, c in zip(names, budgets, capture)]
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


# ---- routing capture ----------------------------------------------------------------------------
CAPTURE = contract.CAPTURE_EXPERTS | contract.CAPTURE_LOGITS


def _capturing_ids(worker) -> list[str]:
    """The engine request ids whose routing the worker holds (vLLM adds a suffix to LLM's ids)."""
    captured = getattr(worker, "worker", worker)._steering_rows.captured
    return list(captured._rows)


def _take_capture(llm, outs) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{output index: (experts [T, R, k], logits [T, R, E])} of the capturing requests among `outs`."""
    held = llm.collective_rpc(_capturing_ids)[0]
    by_output = {i: r for i, out in enumerate(outs) for r in held if r.rsplit("-", 1)[0] == out.request_id}
    taken = llm.collective_rpc(contract.RPC_TAKE_CAPTURE, args=(list(by_output.values()),))[0]
    return {i: (np.load(io.BytesIO(taken[r]["experts"])), np.load(io.BytesIO(taken[r]["logits"])))
            for i, r in by_output.items()}


def _assert_capture_is_transformers_routing(ref, shape, out, prompt, captured, profile, budget):
    """The captured rows equal transformers' routers on the computed positions (the prompt and the output
    but its last token), under the request's profile and effective budget."""
    experts, logits = captured
    seq = prompt + list(out.outputs[0].token_ids)[:-1]
    if profile is not None:
        rows = (profile.bias_rows(), profile.mask_rows())
    else:
        rows = (torch.zeros(shape.num_layers, shape.num_experts),
                torch.zeros(shape.num_layers, shape.num_experts, dtype=torch.int8))
    raw, used, _ = family_reference.routing(ref, shape.router_kind, seq, *rows, budget=budget)
    assert logits.dtype == np.float16 and logits.shape == tuple(raw.shape)
    scale = max(1.0, float(raw.abs().max()))
    torch.testing.assert_close(torch.from_numpy(logits).float(), raw, atol=2e-3 * scale, rtol=0)
    assert experts.shape == tuple(used.shape)
    got = np.sort(experts.astype(np.int64), axis=-1)
    want = used.sort(dim=-1).values.numpy()
    assert np.array_equal(got, want), f"experts differ at (token, row) {np.argwhere((got != want).any(-1))[:5].tolist()}"


def test_capture_layers_are_the_moe_layers(llm, family, reference):
    _, _, shape = family
    layers = llm.collective_rpc(contract.RPC_CAPTURE_LAYERS)[0]
    assert layers == [l for l in range(shape.num_layers) if l not in shape.dense_layers]
    assert layers == family_reference.moe_layers(reference)


def test_unsteered_capture_is_transformers_router_logits_and_top_k(llm, family, reference):
    """transformers' own `output_router_logits` (a tuple: the MoE layers only) and its routers' top-k."""
    _, _, shape = family
    ids = prompts(seed=25, lengths=(7, 16))
    outs = _generate(llm, ids, None, capture=[CAPTURE, CAPTURE])
    captured = _take_capture(llm, outs)
    assert sorted(captured) == [0, 1]
    for i, (out, prompt) in enumerate(zip(outs, ids)):
        seq = prompt + list(out.outputs[0].token_ids)[:-1]
        with torch.no_grad():
            hf = reference(torch.tensor([seq]), output_router_logits=True).router_logits
        experts, logits = captured[i]
        want = torch.stack(hf, dim=1)  # [T, R, E]
        torch.testing.assert_close(torch.from_numpy(logits).float(), want,
                                   atol=2e-3 * max(1.0, float(want.abs().max())), rtol=0)
        _assert_capture_is_transformers_routing(reference, shape, out, prompt, captured[i], None, None)


def test_capture_in_a_mixed_batch_is_each_requests_routing_and_changes_no_token(llm, family, reference):
    _, _, shape = family
    profiles = llm.unipool_profiles
    # budgets on "bias", not "include": an included expert's logit is one ulp above the maximum, a
    # tie in weight that vLLM's unsorted slots and transformers' sorted ones could break apart
    names = [None, "bias", None, "exclude", "include", "bias", None, "include"]
    budgets = [None, None, None, None, None, 1, 1, None]
    capture = [CAPTURE, CAPTURE, 0, CAPTURE, 0, CAPTURE, CAPTURE, CAPTURE]
    if shape.shared_experts:
        names[7] = "shared-only"
    ids = prompts(seed=26, lengths=(6, 13, 9, 21, 11, 8, 17, 10))
    batch = _generate(llm, ids, names, budgets, capture)
    captured = _take_capture(llm, batch)
    assert sorted(captured) == [i for i, c in enumerate(capture) if c]
    plain = _generate(llm, ids, names, budgets)  # the same batch, nothing captured
    assert [list(o.outputs[0].token_ids) for o in batch] == [list(o.outputs[0].token_ids) for o in plain]
    for i in captured:
        profile = profiles[names[i]] if names[i] else None
        budget = contract.effective_budget(budgets[i], contract.parse_budget(profile.expert_budget) if profile else None,
                                           shape.top_k, shape.shared_experts)
        _assert_capture_is_transformers_routing(reference, shape, batch[i], ids[i], captured[i], profile, budget)
        solo = _generate(llm, [ids[i]], [names[i]], [budgets[i]], [CAPTURE])
        assert list(solo[0].outputs[0].token_ids) == list(batch[i].outputs[0].token_ids)
        alone = _take_capture(llm, solo)[0]
        assert np.array_equal(np.sort(alone[0], -1), np.sort(captured[i][0], -1))
        torch.testing.assert_close(torch.from_numpy(alone[1]).float(), torch.from_numpy(captured[i][1]).float(),
                                   atol=2e-3 * max(1.0, float(np.abs(alone[1]).max())), rtol=0)
    dropped = shape.num_experts
    for i in (5, 6):
        assert ((captured[i][0] == dropped).sum(-1) == shape.top_k - 1).all()  # a budget of 1 keeps one slot
    assert not (captured[3][0] < 2).any()  # the profile excluding experts 0 and 1
    if shape.shared_experts:
        assert (captured[7][0] == dropped).all()  # a routed budget of zero: shared experts only
