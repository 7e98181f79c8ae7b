"""`unipool-serve` on a checkpoint of one of vLLM's own MoE families (a tiny Qwen2-MoE: one layer
without experts, a gated shared expert): /ready, bound keys, profile validation, metrics.

Routing is observed through /metrics: for a family each MoE layer is its own "pool", and the
layer without experts has no series."""

from __future__ import annotations

import re

import httpx
import pytest
import torch
from server_launcher import run_server

from unipool_serve.demo.tiny_families import write_family_model
from unipool_serve.model_executor.steering.profile import SteeringProfile
from unipool_serve.model_executor.steering.shape import SteerableModel

pytestmark = pytest.mark.server

ARCH = "Qwen2MoeForCausalLM"
API_KEY, BOUND_KEY, ADMIN_KEY = "user-key", "bound-key", "admin-key"
_SAMPLE = re.compile(r'^unipool_expert_tokens_total\{([^}]*)\} (\S+)$', re.MULTILINE)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = write_family_model(tmp_path_factory.mktemp("qwen2moe"), ARCH, seed=7)
    shape = SteerableModel.from_folder(folder)
    moe = [l for l in range(shape.num_layers) if l not in shape.dense_layers]
    steering = tmp_path_factory.mktemp("steering")
    SteeringProfile.for_config(shape, name="no-e0", exclude={l: [0] for l in moe}).save(steering / "no-e0.safetensors")
    SteeringProfile.for_config(shape, name="shared-only", expert_budget={"top_k": 0}).save(
        steering / "shared-only.safetensors")
    log = tmp_path_factory.mktemp("log") / "server.log"
    args = ["--model", str(folder), "--steering-dir", str(steering), "--api-key", API_KEY,
            "--api-key", f"{BOUND_KEY}=no-e0", "--admin-key", ADMIN_KEY, "--enforce-eager", "--max-model-len", "256",
            "--max-num-seqs", "8", "--served-model-name", "tiny", "--no-enable-prefix-caching"]
    with run_server(args, log, env={"UNIPOOL_METRICS_INTERVAL": "0.5", "VLLM_CPU_KVCACHE_SPACE": "1"}) as process:
        yield process, shape


def _routing(url) -> dict[tuple[int, int], float]:
    text = httpx.get(f"{url}/metrics", timeout=60).text
    out = {}
    for labels, value in _SAMPLE.findall(text):
        found = dict(re.findall(r'(\w+)="(\d+)"', labels))
        out[int(found["pool"]), int(found["expert"])] = float(value)
    return out


def _complete(url, key, steering=None) -> list[float]:
    """The greedy tokens' logprobs (a tiny random model may repeat one token whatever runs)."""
    body = {"model": "tiny", "prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0, "logprobs": 1}
    if steering:
        body["steering"] = steering
    r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["token_logprobs"]


def test_ready_and_bound_key_never_routes_to_the_excluded_expert(served):
    process, shape = served
    assert process.ready_codes[-1] == 200
    before = _routing(process.url)
    assert {p for p, _ in before} == {0, 2}  # layer 1 has no experts: no series
    _complete(process.url, BOUND_KEY)
    after = _routing(process.url)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert sum(delta.values()) > 0 and delta[(0, 0)] == 0 and delta[(2, 0)] == 0


def test_shared_experts_only_request_differs_from_unsteered(served):
    process, _ = served
    assert _complete(process.url, API_KEY, "shared-only") != _complete(process.url, API_KEY)


def test_profiles_describe_the_family_and_reject_other_models(served):
    process, shape = served
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    detail = httpx.get(f"{process.url}/v1/steering/profiles/shared-only", headers=admin, timeout=30).json()
    assert detail["router_kind"] == "softmax" and detail["dense_layers"] == [1]
    assert detail["expert_budget"] == {"top_k": 0}
    bias = torch.zeros(shape.num_layers, shape.num_experts)
    bias[1, 2] = 1.0  # layer 1 has no experts
    steers_dense = SteeringProfile(name="dense", bias=bias, num_layers=shape.num_layers,
                                   num_experts=shape.num_experts, top_k=shape.top_k,
                                   config_fingerprint=shape.fingerprint, architecture=shape.architecture,
                                   router_kind=shape.router_kind)  # dense_layers not recorded: the model check finds it
    r = httpx.post(f"{process.url}/v1/steering/profiles", content=steers_dense.to_bytes(), headers=admin, timeout=30)
    assert r.status_code == 400 and "dense layers" in r.json()["error"]["message"]
    other = SteeringProfile.for_config(SteerableModel.of(_mixtral_config()), name="other")
    r = httpx.post(f"{process.url}/v1/steering/profiles", content=other.to_bytes(), headers=admin, timeout=30)
    assert r.status_code == 400 and "made for another model" in r.json()["error"]["message"]


def test_layer_gauges_cover_only_layers_with_experts(served):
    process, _ = served
    _complete(process.url, API_KEY)
    text = httpx.get(f"{process.url}/metrics", timeout=60).text
    layers = set(re.findall(r'^unipool_layer_routing_entropy_bits\{layer="(\d+)"\}', text, re.MULTILINE))
    assert layers <= {"0", "2"} and layers


def _mixtral_config():
    from transformers import MixtralConfig

    config = MixtralConfig(num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=2, hidden_size=64)
    config.architectures = ["MixtralForCausalLM"]
    return config
