"""The request layer in front of vLLM, without an engine: auth, profile resolution, body rewrite, pinning."""

import asyncio
import json

import pytest

from unipool_serve.model_executor.steering_profile import SteeringProfile
from unipool_serve.model_executor.tiny_model import tiny_config
from unipool_serve.server.gateway import AccessPolicy, SteeringGateway, cache_salt_for
from unipool_serve.server.profile_store import ProfileStore

CFG = tiny_config()


def _store():
    store = ProfileStore(CFG, max_profiles=2)
    for name, expert in (("a", 1), ("b", 2)):
        asyncio.run(store.add(SteeringProfile.for_config(CFG, name=name, exclude={0: [expert]}), persist=False))
    return store


def _call(gateway, body: dict, key: str | None = None, path="/v1/completions"):
    seen = {}

    async def app(scope, receive, send):
        seen["body"] = json.loads((await receive())["body"])
        seen["pinned"] = {n: a.in_flight for n, a in gateway.store_getter().by_name.items()}
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    gateway.app = app
    raw = json.dumps(body).encode()
    messages = [{"type": "http.request", "body": raw, "more_body": False}]
    sent = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    asyncio.run(gateway({"type": "http", "path": path, "method": "POST", "headers": headers}, receive, send))
    status = sent[0]["status"]
    return status, seen if status == 200 else json.loads(sent[1]["body"])["error"]


def test_steering_field_becomes_extra_args_and_salt_and_is_pinned_while_running():
    store = _store()
    gateway = SteeringGateway(None, lambda: store, AccessPolicy())
    status, seen = _call(gateway, {"model": "m", "prompt": "x", "steering": "b", "cache_salt": "mine"})
    assert status == 200 and "steering" not in seen["body"]
    active = store.by_name["b"]
    assert seen["body"]["vllm_xargs"] == {"unipool_steering": "b", "unipool_steering_slot": active.slot,
                                          "unipool_steering_hash": active.content_hash[:16]}
    assert seen["body"]["cache_salt"] == cache_salt_for(active.content_hash, "mine")
    assert seen["pinned"]["b"] == 1 and store.by_name["b"].in_flight == 0  # released afterwards
    _, via_xargs = _call(gateway, {"model": "m", "prompt": "x", "vllm_xargs": {"steering": "b"}, "cache_salt": "mine"})
    assert via_xargs["body"] == seen["body"]
    _, plain = _call(gateway, {"model": "m", "prompt": "x"})
    assert plain["body"] == {"model": "m", "prompt": "x"}  # unsteered requests pass untouched


def test_salts_differ_by_profile_content_and_stay_within_vllm_limits():
    salts = {cache_salt_for(h, u) for h in ("h1", "h2") for u in (None, "x")}
    assert len(salts) == 4
    assert all(len(s) <= 128 and not set(s) & set("@/\\") for s in salts)


def test_keys_bindings_and_bad_requests():
    store = _store()
    policy = AccessPolicy.parse(["k1", "kid=a"], "root")
    gateway = SteeringGateway(None, lambda: store, policy)
    assert _call(gateway, {"prompt": "x"})[0] == 401
    assert _call(gateway, {"prompt": "x"}, key="nope")[0] == 401
    status, seen = _call(gateway, {"prompt": "x"}, key="kid")
    assert status == 200 and seen["body"]["vllm_xargs"]["unipool_steering"] == "a"
    status, error = _call(gateway, {"prompt": "x", "steering": "b"}, key="kid")
    assert status == 403 and error["code"] == "steering_override_forbidden"
    status, error = _call(gateway, {"prompt": "x", "steering": "zzz"}, key="k1")
    assert status == 400 and "available profiles: ['a', 'b']" in error["message"]
    assert _call(gateway, {"prompt": "x", "steering": "a", "vllm_xargs": {"steering": "b"}}, key="k1")[0] == 400
    assert _call(gateway, {"prompt": "x", "vllm_xargs": {"unipool_steering_slot": 1}}, key="k1")[0] == 400
    assert _call(gateway, {"prompt": "x"}, key="root")[0] == 200  # the admin key is a valid key


def test_a_deleted_profile_keeps_its_row_until_its_requests_finish():
    store = _store()  # 2 rows, both used
    pinned = store.acquire("a")
    asyncio.run(store.remove("a"))
    with pytest.raises(Exception, match="steering slots are in use"):  # a's row is still pinned
        asyncio.run(store.add(SteeringProfile.for_config(CFG, name="c"), persist=False))
    asyncio.run(store.release(pinned))
    assert asyncio.run(store.add(SteeringProfile.for_config(CFG, name="c"), persist=False)).slot == pinned.slot


def test_a_replaced_profile_moves_to_a_new_row_and_frees_the_old_one_later():
    pushed = []

    async def push(slot, profile):
        pushed.append((slot, None if profile is None else profile.name))

    store = ProfileStore(CFG, max_profiles=3, push=push)
    asyncio.run(store.add(SteeringProfile.for_config(CFG, name="a"), persist=False))
    pinned = store.acquire("a")
    asyncio.run(store.add(SteeringProfile.for_config(CFG, name="a", exclude={0: [5]}), persist=False, replace=True))
    assert store.by_name["a"].slot != pinned.slot and (pinned.slot, None) not in pushed
    asyncio.run(store.release(pinned))
    assert pushed[-1] == (pinned.slot, None)  # the old row is cleared only now
