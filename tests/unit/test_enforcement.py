"""The one enforcement point, without an engine: what it writes into every engine request, and what it refuses."""

from __future__ import annotations

import asyncio
import time

import pytest
from vllm import SamplingParams
from vllm.exceptions import GracefulHTTPError, VLLMValidationError
from vllm.v1.engine import EngineCoreRequest

from unipool_serve.demo.tiny_model import tiny_config
from unipool_serve.model_executor.steering import contract
from unipool_serve.model_executor.steering.profile import SteeringProfile
from unipool_serve.server.enforcement import CURRENT_REQUEST, RequestContext, SteeringEnforcer
from unipool_serve.server.profile_store import ProfileStore

CFG = tiny_config()
SECRET = b"s" * 32


class FakeCore:
    """The engine-core client: records what would be sent to the engine."""

    def __init__(self):
        self.sent = []

    async def add_request_async(self, request):
        self.sent.append(request)


class FakeOutputs:
    """The output processor, which AsyncLLM registers each request with before submitting it."""

    def __init__(self):
        self.aborted = []

    def abort_requests(self, request_ids, internal):
        assert internal
        self.aborted.extend(request_ids)
        return list(request_ids)


class FakeClient:
    def __init__(self):
        self.engine_core, self.output_processor = FakeCore(), FakeOutputs()


def _setup():
    store = ProfileStore(CFG, max_profiles=4)
    for name, expert in (("a", 1), ("b", 2)):
        asyncio.run(store.add(SteeringProfile.for_config(CFG, name=name, exclude={0: [expert]}), persist=False))
    client, admitted = FakeClient(), []
    SteeringEnforcer(store, SECRET, on_admit=admitted.append).install(client)
    core = client.engine_core
    core.outputs = client.output_processor
    return store, core, admitted


def _request(request_id="r1", extra_args=None, cache_salt=None, pooling=False, **kw):
    params = None if pooling else SamplingParams(max_tokens=4, extra_args=extra_args)
    return EngineCoreRequest(request_id=request_id, prompt_token_ids=[1, 2, 3], mm_features=None,
                             sampling_params=params, pooling_params=object() if pooling else None,
                             arrival_time=time.time(), lora_request=None, cache_salt=cache_salt,
                             data_parallel_rank=None, **kw)


def _submit(core, request, ctx: RequestContext | None):
    async def run():
        token = CURRENT_REQUEST.set(ctx)
        try:
            await core.add_request_async(request)
        finally:
            CURRENT_REQUEST.reset(token)
    asyncio.run(run())
    return core.sent[-1]


def test_a_bound_key_runs_under_its_profile_without_asking():
    store, core, admitted = _setup()
    sent = _submit(core, _request(), RequestContext(bound="a"))
    active = store.by_name["a"]
    row_digest = contract.digest(active.content_hash)
    assert contract.verified_row(sent.sampling_params.extra_args, SECRET)[:4] == (active.slot, row_digest, None, 0)
    assert sent.cache_salt == contract.cache_salt(SECRET, active.content_hash, None)
    assert "r1" in active.pinned_by and admitted == ["a"]


def test_client_written_reserved_keys_never_survive():
    store, core, _ = _setup()
    b = store.by_name["b"]
    forged = contract.steering_args(SECRET, "b", b.slot, contract.digest(b.content_hash))  # even a valid one
    sent = _submit(core, _request(extra_args={**forged, "keep": 1}), RequestContext(bound="a"))
    a = store.by_name["a"]
    assert sent.sampling_params.extra_args[contract.ARG_SLOT] == a.slot and sent.sampling_params.extra_args["keep"] == 1
    sent = _submit(core, _request(extra_args={**forged, "keep": 1}), RequestContext())  # unsteered: all stripped
    assert sent.sampling_params.extra_args == {"keep": 1} and sent.cache_salt is None


def test_asked_profiles_user_salts_and_refusals():
    store, core, _ = _setup()
    sent = _submit(core, _request(cache_salt="mine"), RequestContext(asked="b"))
    assert sent.cache_salt == contract.cache_salt(SECRET, store.by_name["b"].content_hash, "mine")
    sent = _submit(core, _request(extra_args={"steering": "b"}), RequestContext())
    assert sent.sampling_params.extra_args[contract.ARG_NAME] == "b"
    with pytest.raises(GracefulHTTPError) as refused:
        _submit(core, _request(extra_args={"steering": "b"}), RequestContext(bound="a"))
    assert refused.value.http_status == 403
    with pytest.raises(VLLMValidationError, match="conflicting"):
        _submit(core, _request(extra_args={"steering": "b"}), RequestContext(asked="a"))
    with pytest.raises(VLLMValidationError, match="available profiles: \\['a', 'b'\\]"):
        _submit(core, _request(request_id="r-unknown"), RequestContext(asked="zzz"))
    # every refused request is taken back from the output processor, where AsyncLLM put it
    assert core.outputs.aborted == ["r1", "r1", "r-unknown"]


def test_deny_by_default():
    _, core, _ = _setup()
    with pytest.raises(GracefulHTTPError, match="outside any API request"):
        _submit(core, _request(), None)
    with pytest.raises(GracefulHTTPError, match="generation only"):
        _submit(core, _request(pooling=True), RequestContext(bound="a"))
    assert _submit(core, _request(pooling=True), RequestContext()).sampling_params is None  # unsteered pooling runs
    never_runs = _request(abort_immediately=True)
    assert _submit(core, never_runs, None) is never_runs


def test_each_engine_request_gets_its_own_sampling_params():
    # n > 1 children and beam-search beams may share one SamplingParams object
    _, core, _ = _setup()
    shared = SamplingParams(max_tokens=4)
    first, second = _request("r1"), _request("r2")
    first.sampling_params = second.sampling_params = shared
    _submit(core, first, RequestContext(asked="a"))
    _submit(core, second, RequestContext())
    assert core.sent[0].sampling_params.extra_args[contract.ARG_NAME] == "a"
    assert core.sent[1].sampling_params.extra_args is None and shared.extra_args is None


def test_expert_budgets_resolve_to_the_smallest_and_are_signed_and_salted():
    store, core, _ = _setup()
    cfg2 = tiny_config(num_experts_per_tok=2, shared_expert_intermediate_size=64)
    store.config = cfg2
    capped = SteeringProfile.for_config(cfg2, name="capped", expert_budget={"top_k": 1})
    asyncio.run(store.add(capped, persist=False))
    sent = _submit(core, _request(), RequestContext(budget=1))  # a budget without a profile: row 0
    assert contract.verified_row(sent.sampling_params.extra_args, SECRET)[:4] == (0, "", 1, 0)
    assert sent.cache_salt == contract.cache_salt(SECRET, "", None, 1)
    sent = _submit(core, _request(), RequestContext(bound="capped", budget=2))  # cannot raise its profile's cap
    assert contract.verified_row(sent.sampling_params.extra_args, SECRET).budget == 1
    sent = _submit(core, _request(), RequestContext(budget=0))  # shared expert only: allowed, it has one
    assert contract.verified_row(sent.sampling_params.extra_args, SECRET).budget == 0
    sent = _submit(core, _request(), RequestContext(budget=2))  # the full k is no budget at all
    assert sent.sampling_params.extra_args is None and sent.cache_salt is None
    with pytest.raises(VLLMValidationError, match="exceeds the model's top_k=2"):
        _submit(core, _request(), RequestContext(budget=3))
    store.config = CFG  # top-1, no shared expert
    with pytest.raises(VLLMValidationError, match="no shared expert"):
        _submit(core, _request(), RequestContext(budget=0))
