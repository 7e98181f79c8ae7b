"""unipool-steering fit on models of vLLM's own MoE families: the offline source (transformers' own
model), the server source's rows put in their decoder layers, and the one-line errors.

A tiny random Qwen2-MoE (layer 1 without experts, a shared expert), written with transformers'
classes (demo/tiny_families.py). Its routers are deterministic functions of the prompt, so the
label-1 prompts (code) and label-0 prompts (prose) route differently by construction; nothing
here reads what the model emits. The served model and `fit --server` against a live server are
in tests/server/test_family_server.py.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import torch

from unipool_serve.demo.tiny_families import write_family_model
from unipool_serve.model_executor.steering.profile import SteeringProfile
from unipool_serve.model_executor.steering.shape import SteerableModel
from unipool_serve.tools.fit import server as server_mod
from unipool_serve.tools.fit.data import Example
from unipool_serve.tools.fit.family_source import FamilySource
from unipool_serve.tools.fit.server import ServerSource
from unipool_serve.tools.fit.sources import FitSourceError
from unipool_serve.tools.steering_cli import main as steering_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ARCH = "Qwen2MoeForCausalLM"
CAPTURE_OFF = "routing capture is off on this server (UNIPOOL_ROUTING_CAPTURE=0)"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    folder = write_family_model(tmp_path_factory.mktemp("qwen2moe"), ARCH, seed=7)
    return folder, SteerableModel.from_folder(folder)


def write_data(path, per_label: int):
    with open(path, "w") as f:
        for i in range(per_label):
            f.write(json.dumps({"prompt": f"def f{i}(x): return [x * {i} for x in range({i})]", "label": 1}) + "\n")
            f.write(json.dumps({"prompt": f"The weather on day {i} was calm and the sea was quiet", "label": 0})
                    + "\n")
    return path


def _fit(folder, tmp_path, capsys, *extra, per_label: int = 10):
    """(exit code, stdout, stderr) of `unipool-steering fit --model folder` on `per_label` prompts per label."""
    data = write_data(tmp_path / "data.jsonl", per_label)
    capsys.readouterr()
    code = steering_cli(["fit", "--model", str(folder), "--data", str(data), "--name", "calm",
                         "--out", str(tmp_path / "calm.safetensors"), "--lambda", "1e-3", "--alpha", "1", "2",
                         "--surrogate-epochs", "30", "--bias-epochs", "40", "--no-progress", *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_offline_capture_puts_each_moe_layer_in_its_decoder_layers_row(family):
    from transformers import AutoModelForCausalLM

    folder, shape = family
    assert shape.dense_layers == (1,)
    source = FamilySource(folder, shape)
    [trace] = source.capture([Example(label=1, prompt="def add(a, b):")], progress=False)
    ids = source.token_span(Example(label=1, prompt="def add(a, b):"))[0]
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        rows = model(torch.tensor([ids]), output_router_logits=True).router_logits  # the MoE layers only
    assert trace.shape == (len(ids), 3, shape.num_experts) and len(rows) == 2
    assert torch.equal(trace[:, 0], rows[0]) and torch.equal(trace[:, 2], rows[1])
    assert not trace[:, 1].any()  # the layer without experts


def test_offline_fit_writes_a_profile_for_the_family(family, tmp_path, capsys):
    folder, shape = family
    code, out, err = _fit(folder, tmp_path, capsys)
    assert code == 0, err
    profile = SteeringProfile.load(tmp_path / "calm.safetensors", shape)  # validated against the model
    assert profile.config_fingerprint == shape.fingerprint and profile.architecture == ARCH
    assert profile.dense_layers == (1,) and not profile.bias[1].any() and 1 not in profile.exclude
    assert profile.bias.any() or profile.exclude  # it steers something
    assert profile.provenance["source"] == f"transformers model {folder}"
    assert "| unsteered" in out


def test_offline_judging_steers_transformers_model(family):
    folder, shape = family
    source = FamilySource(folder, shape)
    moe = [l for l in range(shape.num_layers) if l not in shape.dense_layers]
    prompts = [Example(label=1, prompt="def add(a, b):"), Example(label=0, prompt="The sea was calm")]
    plain = source.generate(prompts, None, 8, progress=False)
    assert plain == source.generate(prompts, None, 8, progress=False)  # greedy
    shared_only = SteeringProfile.for_config(shape, name="shared-only", expert_budget={"top_k": 0})
    steered = SteeringProfile.for_config(shape, name="steered", include={l: [5] for l in moe},
                                         exclude={l: [0, 1, 2, 3] for l in moe})
    assert source.generate(prompts, shared_only, 8, progress=False) != plain
    assert source.generate(prompts, steered, 8, progress=False) != plain
    budget_one = SteeringProfile.for_config(shape, name="one", expert_budget={"top_k": 1})
    with pytest.raises(FitSourceError, match="not modelled offline"):
        source.generate(prompts, budget_one, 8, progress=False)


def test_too_few_examples_per_label_is_one_line(family, tmp_path, capsys):
    folder, _ = family
    code, _, err = _fit(folder, tmp_path, capsys, per_label=2)
    assert code == 2 and err.count("\n") == 1 and "label 0 has 2 example(s); need at least 3" in err
    assert not (tmp_path / "calm.safetensors").exists()


# ---- through a server (a fake that follows the capture contract) ---------------------
def _npy(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return base64.b64encode(buffer.getvalue()).decode()


class FamilyServer:
    """Serves a family with MoE layers `layers`: router_logits rows for those layers only, named by
    routed_experts_layers; the value at [t, r, e] is 10 * layer + e."""

    def __init__(self, fingerprint: str, layers=(0, 2), experts: int = 8, capture_off: bool = False,
                 named_layers=None):
        self.fingerprint, self.layers, self.experts = fingerprint, list(layers), experts
        self.capture_off, self.named_layers = capture_off, named_layers

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "tiny"}]})
        if path == "/ready":
            return httpx.Response(200, json={"status": "ready", "model": {"architecture": ARCH,
                                                                          "fingerprint": self.fingerprint}})
        if self.capture_off:
            return httpx.Response(400, json={"error": {"message": CAPTURE_OFF}})
        body = json.loads(request.content)
        tokens = 1 + len(body["prompt"])
        values = np.array([[[10 * l + e for e in range(self.experts)] for l in self.layers]] * tokens, np.float16)
        choice = {"text": "x", "router_logits": _npy(values),
                  "routed_experts_layers": self.layers if self.named_layers is None else self.named_layers}
        return httpx.Response(200, json={"choices": [choice], "usage": {"prompt_tokens": tokens}})


def test_server_rows_go_to_their_decoder_layers(family):
    _, shape = family
    source = ServerSource("http://fake:8000", transport=httpx.MockTransport(FamilyServer(shape.fingerprint)),
                          num_layers=shape.num_layers)
    source.check_model(shape, "qwen2moe")
    [trace] = source.capture([Example(label=1, prompt="ab")], progress=False)
    assert trace.dtype == torch.float16 and trace.shape == (3, 3, 8)
    assert trace[0, 0].tolist() == list(range(8)) and trace[0, 2].tolist() == list(range(20, 28))
    assert not trace[:, 1].any()
    bad = FamilyServer(shape.fingerprint, named_layers=[0, 3])
    with pytest.raises(FitSourceError, match=r"routed_experts_layers \[0, 3\], expected 2 distinct decoder layers"):
        ServerSource("http://fake:8000", transport=httpx.MockTransport(bad), num_layers=3).capture(
            [Example(label=1, prompt="ab", line=4)], progress=False)


@pytest.fixture
def fake_server(monkeypatch):
    def use(fake):
        real = server_mod.ServerSource
        monkeypatch.setattr(server_mod, "ServerSource",
                            lambda url, **kw: real(url, transport=httpx.MockTransport(fake), **kw))
    return use


def test_server_of_another_model_is_one_line(family, tmp_path, capsys, fake_server):
    folder, shape = family
    fake_server(FamilyServer("0123456789abcdef"))
    code, _, err = _fit(folder, tmp_path, capsys, "--server", "http://fake:8000")
    assert code == 2 and err.count("\n") == 1
    assert (f"http://fake:8000 serves {ARCH} (fingerprint 0123456789abcdef) but --model {folder} is {ARCH} "
            f"(fingerprint {shape.fingerprint})") in err
    assert not (tmp_path / "calm.safetensors").exists()


def test_server_with_capture_off_is_one_line(family, tmp_path, capsys, fake_server):
    folder, shape = family
    fake_server(FamilyServer(shape.fingerprint, capture_off=True))
    code, _, err = _fit(folder, tmp_path, capsys, "--server", "http://fake:8000")
    assert code == 2 and err.count("\n") == 1 and f"HTTP 400: {CAPTURE_OFF}" in err


def test_unsupported_architecture_is_one_line(tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=2, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path / "llama")
    code, _, err = _fit(tmp_path / "llama", tmp_path, capsys)
    assert code == 2 and err.count("\n") == 1 and "LlamaForCausalLM" in err


def test_offline_probe_for_the_family_scores_its_moe_layers(family, tmp_path, capsys):
    """`unipool-steering probe` captures a family offline as fit does; the probe's rows are the MoE layers
    (the dense layer has none) and it loads for that model only."""
    from unipool_serve.model_executor.steering.probe import RoutingProbe

    folder, shape = family
    data = write_data(tmp_path / "data.jsonl", 10)
    capsys.readouterr()
    code = steering_cli(["probe", "--model", str(folder), "--data", str(data), "--name", "codey",
                         "--out", str(tmp_path / "codey.safetensors"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    probe = RoutingProbe.load(tmp_path / "codey.safetensors", SteerableModel.from_folder(folder))
    assert probe.layers == (0, 2) and tuple(probe.weight.shape) == (2, shape.num_experts)
    assert probe.architecture == ARCH
