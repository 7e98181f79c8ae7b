"""`unipool-serve` on a checkpoint of one of vLLM's own MoE families (a tiny Qwen2-MoE: one layer
without experts, a gated shared expert): /ready, bound keys, profile validation, metrics, routing
capture (one row per MoE layer, named by routed_experts_layers), and `unipool-steering fit --server`.

Routing is observed through /metrics: for a family each MoE layer is its own "pool", and the
layer without experts has no series."""

from __future__ import annotations

import base64
import io
import json
import re

import httpx
import numpy as np
import pytest
import torch
from server_launcher import run_server

from unipool_serve.demo.tiny_families import load_reference, write_family_model
from unipool_serve.model_executor.steering.profile import SteeringProfile
from unipool_serve.model_executor.steering.shape import SteerableModel

pytestmark = pytest.mark.server

ARCH = "Qwen2MoeForCausalLM"
API_KEY, BOUND_KEY, ADMIN_KEY = "user-key", "bound-key", "admin-key"
_SAMPLE = re.compile(r'^unipool_expert_tokens_total\{([^}]*)\} (\S+)$', re.MULTILINE)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_family_model(tmp_path_factory.mktemp("qwen2moe"), ARCH, seed=7)


@pytest.fixture(scope="module")
def served(folder, tmp_path_factory):
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
    args += ["--dtype", "float32"]  # captured logits compared with transformers' fp32 model
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


def _array(field: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(field)), allow_pickle=False)


def test_ready_names_the_model_fit_must_be_made_for(served):
    process, shape = served
    ready = httpx.get(f"{process.url}/ready", timeout=30).json()
    assert ready["model"] == {"architecture": ARCH, "fingerprint": shape.fingerprint}


def test_capture_has_one_row_per_moe_layer_and_is_transformers_routing(served, folder):
    process, shape = served
    prompt = list(range(5, 25))
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0, "return_routed_experts": True,
            "return_router_logits": True}
    r = httpx.post(f"{process.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["routed_experts_layers"] == [0, 2]  # layer 1 has no experts: no row
    experts, logits = _array(choice["routed_experts"]), _array(choice["router_logits"])
    assert experts.shape == (len(prompt), 2, shape.top_k) and logits.shape == (len(prompt), 2, shape.num_experts)
    with torch.no_grad():
        want = torch.stack(load_reference(folder)(torch.tensor([prompt]), output_router_logits=True)
                           .router_logits, dim=1)  # transformers' MoE layers only
    torch.testing.assert_close(torch.from_numpy(logits).float(), want, atol=2e-3 * max(1.0, float(want.abs().max())),
                               rtol=0)
    top = want.softmax(-1).topk(shape.top_k, dim=-1).indices.sort(-1).values.numpy()
    assert np.array_equal(np.sort(experts, -1), top)


def _fit_data(path):
    with open(path, "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"def f{i}(x): return [x * {i} for x in range({i})]", "label": 1}) + "\n")
            f.write(json.dumps({"prompt": f"The weather on day {i} was calm and the sea was quiet", "label": 0})
                    + "\n")
    return path


def _fit(model, url, tmp_path, *extra):
    import subprocess
    import sys

    argv = [sys.executable, "-m", "unipool_serve.tools.steering_cli", "fit", "--model", str(model), "--server", url,
            "--api-key", API_KEY, "--data", str(_fit_data(tmp_path / "data.jsonl")), "--name", "fitted",
            "--out", str(tmp_path / "fitted.safetensors"), "--lambda", "1e-3", "--alpha", "1", "2",
            "--surrogate-epochs", "30", "--bias-epochs", "40", "--threads", "1", "--no-progress", *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600)


def test_fit_through_the_server_makes_a_profile_it_serves(served, folder, tmp_path):
    process, shape = served
    from unipool_serve.tools.fit.data import Example
    from unipool_serve.tools.fit.family_source import FamilySource
    from unipool_serve.tools.fit.server import ServerSource

    examples = [Example(label=1, prompt="def add(a, b):"), Example(label=0, prompt="The sea was calm today")]
    source = ServerSource(process.url, api_key=API_KEY, num_layers=shape.num_layers)
    try:
        served_traces = source.capture(examples, progress=False)
    finally:
        source.close()
    offline = FamilySource(folder, shape, model=load_reference(folder)).capture(examples, progress=False)
    for got, want in zip(served_traces, offline):  # the server's rows land where the offline source puts them
        assert got.dtype == torch.float16 and got.shape == want.shape and not got[:, 1].any()
        torch.testing.assert_close(got.float(), want, atol=2e-3 * max(1.0, float(want.abs().max())), rtol=0)
    done = _fit(folder, process.url, tmp_path)
    assert done.returncode == 0, done.stderr
    profile = SteeringProfile.load(tmp_path / "fitted.safetensors", shape)
    assert profile.config_fingerprint == shape.fingerprint and profile.provenance["source"] == f"server {process.url}"
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    r = httpx.post(f"{process.url}/v1/steering/profiles", content=profile.to_bytes(), headers=admin, timeout=30)
    assert r.status_code == 201, r.text
    try:
        _complete(process.url, API_KEY, "fitted")
    finally:
        httpx.delete(f"{process.url}/v1/steering/profiles/fitted", headers=admin, timeout=30)


def test_fit_for_another_model_than_the_served_one_is_one_line(served, tmp_path):
    process, shape = served
    other = write_family_model(tmp_path / "mixtral", "MixtralForCausalLM", seed=1)
    done = _fit(other, process.url, tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"serves {ARCH} (fingerprint {shape.fingerprint}) but --model {other} is MixtralForCausalLM" in done.stderr
    assert not (tmp_path / "fitted.safetensors").exists()


def _mixtral_config():
    from transformers import MixtralConfig

    config = MixtralConfig(num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=2, hidden_size=64)
    config.architectures = ["MixtralForCausalLM"]
    return config
