"""The profile store: engine rows, pins that last as long as the engine runs the request, domain errors."""

from __future__ import annotations

import asyncio

import pytest

from unipool_serve.demo.tiny_model import tiny_config
from unipool_serve.model_executor.steering.profile import SteeringProfile
from unipool_serve.server.profile_store import ProfileExists, ProfileStore, SlotsFull, UnknownProfile

CFG = tiny_config()


def _profile(name, expert=1):
    return SteeringProfile.for_config(CFG, name=name, exclude={0: [expert]})


def _store(max_profiles=2):
    pushed, live = [], set()

    async def push(slot, profile):
        pushed.append((slot, None if profile is None else profile.name))

    store = ProfileStore(CFG, max_profiles=max_profiles, push=push, is_live=live.__contains__)
    return store, pushed, live


def test_a_deleted_profile_keeps_its_row_while_an_admitted_request_runs():
    store, pushed, live = _store()
    for name in ("a", "b"):
        asyncio.run(store.add(_profile(name), persist=False))
    a = store.by_name["a"]
    store.pin(a, "req-1")
    live.add("req-1")
    assert asyncio.run(store.remove("a")) == 1  # one request still runs with it
    with pytest.raises(SlotsFull):
        asyncio.run(store.add(_profile("c"), persist=False))
    assert (a.slot, None) not in pushed  # its row was never cleared
    live.discard("req-1")  # the engine finished (or aborted) it: no release call needed
    assert asyncio.run(store.add(_profile("c"), persist=False)).slot == a.slot
    assert pushed[-2:] == [(a.slot, None), (a.slot, "c")]


def test_a_replaced_profile_moves_to_a_new_row_and_frees_the_old_one_later():
    store, pushed, live = _store(max_profiles=3)
    asyncio.run(store.add(_profile("a"), persist=False))
    old = store.by_name["a"]
    store.pin(old, "req-1")
    live.add("req-1")
    asyncio.run(store.add(_profile("a", expert=5), persist=False, replace=True))
    assert store.by_name["a"].slot != old.slot and (old.slot, None) not in pushed
    live.clear()
    asyncio.run(store.add(_profile("b"), persist=False))  # finding a free row frees the retired one
    assert (old.slot, None) in pushed


def test_domain_errors_name_the_case():
    store, _, _ = _store()
    asyncio.run(store.add(_profile("a"), persist=False))
    with pytest.raises(ProfileExists, match="already exists"):
        asyncio.run(store.add(_profile("a"), persist=False))
    with pytest.raises(UnknownProfile, match=r"available profiles: \['a'\]"):
        store.get("zzz")
    assert UnknownProfile.code == "unknown_steering_profile"


def test_a_directory_with_a_bad_file_loads_the_rest(tmp_path):
    _profile("good").save(tmp_path / "good.safetensors")
    _profile("other").save(tmp_path / "misnamed.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not a profile")
    store = ProfileStore(CFG, max_profiles=4, directory=tmp_path)
    asyncio.run(store.load_directory())
    assert store.names() == ["good"]
    assert set(store.load_errors) == {"misnamed.safetensors", "broken.safetensors"}
