"""Per-request steering inside the vLLM engine (steering worker + persistent tables).

One engine with the steering worker for the module, plus one plain engine for the
"no steering support" baseline. Profiles are pushed and requests steered through
OfflineSteering, which speaks the server's contract (steering/contract.py).
"""

import pytest
import torch

from engine_checks import LOGPROB_TOL, prompts, reference_model, start_engine, stop_engine
from unipool_serve.model_executor.config import UniPoolConfig
from unipool_serve.model_executor.steering import contract
from unipool_serve.model_executor.steering.offline import OfflineSteering
from unipool_serve.model_executor.steering.profile import SteeringProfile

pytestmark = pytest.mark.engine

WORKER = "unipool_serve.model_executor.steering.worker.SteeringWorker"
LAYOUT = dict(num_hidden_layers=4, num_experts=8, num_experts_per_tok=2, router_type="softmax",
              norm_topk_prob=True, expert_intermediate_size=64, initializer_range=0.1)
SEED = 5
TOKENS = 24


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return tiny_model_factory("steering_engine", seed=SEED, **LAYOUT)


@pytest.fixture(scope="module")
def config(model_dir):
    return UniPoolConfig.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def profiles(config):
    L, E = config.num_hidden_layers, config.num_experts
    bias = torch.zeros(L, E)
    bias[:, 3], bias[:, 6] = 2.5, -2.5
    return {
        "bias": SteeringProfile.for_config(config, name="bias", bias=bias, alpha=1.5),
        "no-e0": SteeringProfile.for_config(config, name="no-e0", exclude={l: [0] for l in range(L)}),
        "with-e7": SteeringProfile.for_config(config, name="with-e7", include={l: [7] for l in range(L)},
                                              bias=torch.randn(L, E, generator=torch.Generator().manual_seed(0))),
    }


@pytest.fixture(scope="module")
def plain_tokens(model_dir):
    """Greedy tokens from an engine WITHOUT steering support (default worker)."""
    llm = start_engine(model_dir)
    try:
        return _generate(llm, prompts(seed=11), None, {})
    finally:
        stop_engine(llm)


@pytest.fixture(scope="module")
def llm(model_dir, profiles, plain_tokens):  # plain_tokens first: never two engines at once
    engine = start_engine(model_dir, worker_cls=WORKER, enable_prefix_caching=True)
    engine.unipool_steering = OfflineSteering(engine)
    for profile in profiles.values():
        engine.unipool_steering.add(profile)
    yield engine
    stop_engine(engine)


def _generate(llm, prompt_ids, names, profiles, budgets=None):
    """Greedy tokens; steered requests get the server's cache salt (prefix caching is on)."""
    from vllm import SamplingParams

    names = names or [None] * len(prompt_ids)
    budgets = budgets or [None] * len(prompt_ids)
    steering = getattr(llm, "unipool_steering", None)
    params, inputs = [], []
    for p, name, budget in zip(prompt_ids, names, budgets):
        steered = name is not None or budget is not None
        params.append(SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True,
                                     extra_args=steering.extra_args(name, budget) if steered else None))
        request = {"prompt_token_ids": p}
        if steered:
            request["cache_salt"] = steering.cache_salt(name, budget=budget)
        inputs.append(request)
    return [list(o.outputs[0].token_ids) for o in llm.generate(inputs, params, use_tqdm=False)]


def _routing_counts(llm):
    return torch.tensor(llm.collective_rpc("unipool_routing_stats")[0])  # [L, E]


@torch.no_grad()
def _assert_reference_agrees(ref, prompt, tokens, profile, budget=None):
    """Teacher-forced greedy check against the reference model steered with the same profile (and budget)."""
    kwargs = {"expert_budget": budget}
    if profile is not None:
        kwargs |= dict(steering_bias=profile.bias_rows()[None], steering_mask=profile.mask_rows()[None])
    logits = ref(torch.tensor([prompt + tokens]), **kwargs).logits[0].double()
    lp = torch.log_softmax(logits, -1)[len(prompt) - 1: -1]  # rows predicting each generated token
    unclear = 0
    for j, token in enumerate(tokens):
        top = lp[j].topk(2)
        if (top.values[0] - top.values[1]).item() <= LOGPROB_TOL:
            unclear += 1
            continue
        assert token == int(top.indices[0]), f"token {j}: engine {token}, reference {int(top.indices[0])}"
    assert unclear <= 0.1 * len(tokens)


def test_no_profile_equals_an_engine_without_steering(llm, plain_tokens):
    assert _generate(llm, prompts(seed=11), None, {}) == plain_tokens


def test_mixed_batch_equals_solo_runs_and_the_reference(llm, profiles, model_dir):
    ids = prompts(seed=12, lengths=(5, 17, 9, 30, 12, 21, 7, 14))
    names = [None, "bias", "no-e0", "with-e7", "bias", None, "with-e7", "no-e0"]
    batch = _generate(llm, ids, names, profiles)
    for p, name, tokens in zip(ids, names, batch):
        assert _generate(llm, [p], [name], profiles)[0] == tokens
    steered_differs = [batch[i] != _generate(llm, [ids[i]], None, profiles)[0] for i in range(len(ids)) if names[i]]
    assert sum(steered_differs) >= 4  # the profiles really change these tiny models' outputs
    ref = reference_model(model_dir)
    for p, name, tokens in zip(ids, names, batch):
        _assert_reference_agrees(ref, p, tokens, profiles[name] if name else None)


def test_exclude_never_routes_and_include_always_routes(llm, profiles, config):
    ids = prompts(seed=13, lengths=(11, 19))
    computed = sum(len(p) + TOKENS - 1 for p in ids)  # prefill + every decode input but the last
    before = _routing_counts(llm)
    _generate(llm, ids, ["no-e0", "no-e0"], profiles)
    delta = _routing_counts(llm) - before
    assert (delta[:, 0] == 0).all() and (delta.sum(1) == computed * config.num_experts_per_tok).all()
    before = _routing_counts(llm)
    _generate(llm, ids, ["with-e7", "with-e7"], profiles)
    delta = _routing_counts(llm) - before
    assert (delta[:, 7] == computed).all()  # every computed token, every layer


def test_prefix_caching_keeps_profiles_apart(llm, profiles, model_dir):
    shared = prompts(seed=14, lengths=(48,))[0]
    a, b = shared + [5, 6, 7], shared + [5, 6, 8]
    first = _generate(llm, [a], ["bias"], profiles)[0]
    second = _generate(llm, [b], ["no-e0"], profiles)[0]
    ref = reference_model(model_dir)
    _assert_reference_agrees(ref, a, first, profiles["bias"])
    _assert_reference_agrees(ref, b, second, profiles["no-e0"])
    # the same profile still shares the prefix: same answer again, with cached blocks
    again = _generate(llm, [b], ["no-e0"], profiles)[0]
    assert again == second


def _run_with_extra_args(llm, prompt, extra):
    from vllm import SamplingParams

    out = llm.generate([{"prompt_token_ids": prompt}],
                       SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True, extra_args=extra),
                       use_tqdm=False)
    return list(out[0].outputs[0].token_ids)


def test_a_replaced_row_is_served_unsteered_not_with_the_wrong_profile(llm, profiles):
    # A request that names a row whose content changed (the API layer prevents this by
    # pinning rows) must not be steered by whatever now occupies the row.
    p = prompts(seed=15, lengths=(13,))
    slot = llm.unipool_steering.rows["bias"][0]
    stale = contract.steering_args(llm.unipool_steering.secret, "bias", slot, "0000000000000000")
    assert _run_with_extra_args(llm, p[0], stale) == _generate(llm, p, None, profiles)[0]


def test_forged_steering_fields_are_ignored(llm, profiles):
    # Steering fields not signed by the secret the engine was given (what a client could write
    # if any path let it reach extra_args) select nothing: the request runs unsteered.
    p = prompts(seed=16, lengths=(13,))
    computed = len(p[0]) + TOKENS - 1
    slot, profile = llm.unipool_steering.rows["with-e7"]
    forged = contract.steering_args(b"not the engine's secret", "with-e7", slot,
                                    contract.digest(profile.content_hash()))
    runs = {}
    for kind, run in (("signed", lambda: _generate(llm, p, ["with-e7"], profiles)[0]),
                      ("plain", lambda: _generate(llm, p, None, profiles)[0]),
                      ("forged", lambda: _run_with_extra_args(llm, p[0], forged))):
        before = _routing_counts(llm)
        runs[kind] = (run(), _routing_counts(llm) - before)
    assert (runs["signed"][1][:, 7] == computed).all()  # the signed row steers: every token to expert 7
    assert runs["forged"][0] == runs["plain"][0] and torch.equal(runs["forged"][1], runs["plain"][1])


def test_expert_budgets_in_a_mixed_batch(llm, profiles, model_dir, config):
    # top-2 model: a budget of 1 keeps each token's best expert only (renormalised: this router
    # renormalises), alone or with a profile, beside full-budget requests in the same batch.
    ids = prompts(seed=17, lengths=(9, 14, 6, 11))
    names, budgets = [None, None, "bias", "no-e0"], [None, 1, 1, None]
    batch = _generate(llm, ids, names, profiles, budgets)
    for p, name, budget, tokens in zip(ids, names, budgets, batch):
        assert _generate(llm, [p], [name], profiles, [budget])[0] == tokens
    ref = reference_model(model_dir)
    for p, name, budget, tokens in zip(ids, names, budgets, batch):
        _assert_reference_agrees(ref, p, tokens, profiles[name] if name else None, budget)
    computed = len(ids[1]) + TOKENS - 1
    before = _routing_counts(llm)
    _generate(llm, [ids[1]], [None], profiles, [1])
    delta = _routing_counts(llm) - before
    assert (delta.sum(1) == computed).all()  # one expert per token and layer, not top-k = 2: dropped slots cost nothing
