"""The bundled demo model through `unipool-serve` with no --model: vLLM CPU equals the reference,
and the shipped `prose` profile switches code continuations to prose through real HTTP."""

from __future__ import annotations

import httpx
import pytest
from server_launcher import run_server

from unipool_serve.demo.eval import MAX_NEW_TOKENS, PROMPTS_CODE, greedy_continuations, kind_shares

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    log = tmp_path_factory.mktemp("demo-server") / "server.log"
    with run_server(["--enforce-eager", "--max-num-seqs", "64"], log, env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as server:
        yield server


def _complete(server, prompts, steering=None) -> list[str]:
    body = {"model": "unipool-demo", "prompt": prompts, "max_tokens": MAX_NEW_TOKENS, "min_tokens": MAX_NEW_TOKENS,
            "temperature": 0}
    if steering:
        body["steering"] = steering
    resp = httpx.post(f"{server.url}/v1/completions", json=body, timeout=600)
    assert resp.status_code == 200, resp.text
    choices = sorted(resp.json()["choices"], key=lambda c: c["index"])
    return [c["text"] for c in choices]


def test_default_model_is_the_demo_with_its_profiles(served):
    assert [m["id"] for m in httpx.get(f"{served.url}/v1/models").json()["data"]] == ["unipool-demo"]
    assert httpx.get(f"{served.url}/ready").json()["steering_profiles"] == ["code", "prose"]


def test_served_greedy_continuations_equal_the_reference(served, demo):
    model, tokenizer = demo
    prompts = PROMPTS_CODE[:3] + ["The old river", "def area(width, height):"]
    assert _complete(served, prompts) == greedy_continuations(model, tokenizer, prompts)


def test_prose_profile_switches_code_prompts_through_the_server(served):
    # Reference model, fp32, all 40 prompts: code share 100% unsteered, 35% with `prose`
    # (docs/demo-model.md); the margins below leave room for vLLM's different summation order.
    plain = kind_shares(_complete(served, PROMPTS_CODE))
    steered = kind_shares(_complete(served, PROMPTS_CODE, steering="prose"))
    assert plain["code"] >= 0.9
    assert steered["code"] <= 0.6
    assert plain["code"] - steered["code"] >= 0.35


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_open_mode_steering_cannot_poison_the_prefix_cache(served, path):
    # No keys (the default): a client steers a long prompt first; another client's unsteered
    # request for the same prompt must equal one computed from scratch (a fresh cache salt).
    prompt = "The old river ran past the mill and the farm, " * 8 + path
    body = {"model": "unipool-demo", "max_tokens": 8, "temperature": 0}
    body |= {"prompt": prompt} if path == "/v1/completions" else {"messages": [{"role": "user", "content": prompt}]}
    attack = httpx.post(f"{served.url}{path}", json={**body, "steering": "prose"}, timeout=600)
    assert attack.status_code == 200, attack.text
    after_attack = httpx.post(f"{served.url}{path}", json=body, timeout=600).json()["choices"]
    fresh = httpx.post(f"{served.url}{path}", json={**body, "cache_salt": "fresh-compute"}, timeout=600).json()["choices"]
    assert after_attack == fresh
