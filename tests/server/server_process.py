"""A real `unipool-serve` process on a tiny model, shared by the server tests."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from server_launcher import run_server

from unipool_serve.model_executor.steering.profile import SteeringProfile
from unipool_serve.demo.tiny_model import tiny_config

API_KEY, BOUND_KEY, ADMIN_KEY = "user-key", "kid-key", "admin-key"


def write_profiles(model_dir: Path, steering_dir: Path) -> None:
    config = tiny_config()  # the same config the tiny model was written with
    steering_dir.mkdir()
    for name, exclude in (("no-e0", [0]), ("no-e1", [1])):
        SteeringProfile.for_config(config, name=name, exclude={l: exclude for l in range(config.num_hidden_layers)},
                                   description=f"never route to expert {exclude[0]}").save(steering_dir / f"{name}.safetensors")
    SteeringProfile.for_config(config, name="push-e5", bias=expert_bias(config, 5, 3.0), alpha=2.0).save(steering_dir / "push-e5.safetensors")
    (steering_dir / "broken.safetensors").write_bytes(b"not a profile")


def expert_bias(config, expert: int, value: float):
    """A [L, E] bias that pushes one expert in every layer."""
    import torch

    bias = torch.zeros(config.num_hidden_layers, config.num_experts)
    bias[:, expert] = value
    return bias


class Server:
    def __init__(self, process, steering_dir: Path):
        self.url, self.proc, self.log, self.ready_codes = process.url, process.proc, process.log, process.ready_codes
        self.steering_dir = steering_dir

    def client(self, key: str | None = API_KEY):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, timeout=120)

    def http(self, key: str | None = API_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)


@pytest.fixture(scope="module")
def server(tiny_model_factory, tmp_path_factory):
    model = tiny_model_factory("server-model", seed=0)
    steering_dir = tmp_path_factory.mktemp("server") / "steering"
    write_profiles(model, steering_dir)
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    args = ["--model", str(model), "--steering-dir", str(steering_dir), "--api-key", API_KEY,
            "--api-key", f"{BOUND_KEY}=no-e0", "--admin-key", ADMIN_KEY, "--grace-period", "20",
            "--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "32", "--no-enable-prefix-caching",
            "--served-model-name", "tiny"]
    with run_server(args, log, env={"UNIPOOL_METRICS_INTERVAL": "0.5", "VLLM_CPU_KVCACHE_SPACE": "1"}) as process:
        yield Server(process, steering_dir)
