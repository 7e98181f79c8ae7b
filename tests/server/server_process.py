"""Real `unipool-serve` processes on a tiny model, shared by the server tests.

Every profile here steers in a way the routing counts can prove whatever the model's
weights: `only-e5` routes every token of every layer to expert 5 (an include), `no-e0`
never routes to expert 0 (an exclude). `Server.routing` reads the per-expert counts
from /metrics, which refreshes them from the engine on every scrape, so the difference
around one request is exactly that request's routing.
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path

import httpx
import pytest
from server_launcher import run_server, shared

from unipool_serve.model_executor.steering.profile import SteeringProfile

API_KEY, BOUND_KEY, ADMIN_KEY = "user-key", "kid-key", "admin-key"
GATED_KEY = "gated-key"  # bound to only-e5 once probe `always` fires, and probe `never` scoring every request
PROMPT = "def add(a, b):"
_EXPERT_SAMPLE = re.compile(r'^unipool_expert_tokens_total\{([^}]*)\} (\S+)$', re.MULTILINE)


def expert_bias(config, expert: int, value: float):
    """A [L, E] bias that pushes one expert in every layer."""
    import torch

    bias = torch.zeros(config.num_hidden_layers, config.num_experts)
    bias[:, expert] = value
    return bias


def write_profiles(steering_dir: Path, config) -> None:
    layers = range(config.num_hidden_layers)
    steering_dir.mkdir()
    for name, exclude in (("no-e0", [0]), ("no-e1", [1])):
        SteeringProfile.for_config(config, name=name, exclude={l: exclude for l in layers},
                                   description=f"never route to expert {exclude[0]}").save(steering_dir / f"{name}.safetensors")
    SteeringProfile.for_config(config, name="only-e5", include={l: [5] for l in layers},
                               description="every token to expert 5").save(steering_dir / "only-e5.safetensors")
    SteeringProfile.for_config(config, name="push-e5", bias=expert_bias(config, 5, 3.0), alpha=2.0).save(
        steering_dir / "push-e5.safetensors")
    (steering_dir / "broken.safetensors").write_bytes(b"not a profile")


def write_probes(probe_dir: Path, config) -> None:
    """Two probes whose decision does not depend on the model's weights: `always` fires on every prompt,
    `never` on none (zero weights, a bias of +-12: scores of 1 - 6e-6 and 6e-6)."""
    import torch

    from unipool_serve.model_executor.steering.probe import RoutingProbe

    probe_dir.mkdir()
    for name, bias in (("always", 12.0), ("never", -12.0)):
        RoutingProbe.for_model(config, name=name, weight=torch.zeros(config.num_hidden_layers, config.num_experts),
                               bias=bias, threshold=0.5, description=f"fires {name}").save(
            probe_dir / f"{name}.safetensors")


class Server:
    def __init__(self, process, steering_dir: Path):
        self.url, self.proc, self.log, self.ready_codes = process.url, process.proc, process.log, process.ready_codes
        self.steering_dir = steering_dir

    def client(self, key: str | None = API_KEY):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, timeout=600)

    def http(self, key: str | None = API_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def engine_processes(self) -> list:
        """The server's engine-core processes (vLLM's EngineCore), as psutil processes."""
        import psutil

        return [p for p in psutil.Process(self.proc.pid).children(recursive=True)
                if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name()]

    @contextlib.contextmanager
    def engine_frozen(self):
        """SIGSTOP the engine core for the block: the API still admits requests, but no step runs,
        so nothing admitted meanwhile can finish (utility calls wait in its queue)."""
        engines = self.engine_processes()
        assert engines, "no engine process found"
        for engine in engines:
            engine.suspend()
        try:
            yield
        finally:
            for engine in engines:
                engine.resume()

    def admitted(self, profile: str) -> float:
        """Requests the API has admitted under `profile` so far (unipool_steering_requests_total)."""
        text = httpx.get(f"{self.url}/metrics", timeout=60).text
        match = re.search(rf'^unipool_steering_requests_total{{profile="{re.escape(profile)}"}} (\S+)$', text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def wait_admitted(self, profile: str, count: float) -> None:
        """Poll until the API has admitted `count` requests under `profile` in all (an observed event;
        the deadline only guards against a hang)."""
        deadline = time.monotonic() + 600
        while self.admitted(profile) < count and time.monotonic() < deadline:
            time.sleep(0.2)

    def routing(self) -> dict[int, float]:
        """Token-slots routed to each expert so far (summed over layers), fresh from the engine."""
        text = httpx.get(f"{self.url}/metrics", timeout=60).text
        counts: dict[int, float] = {}
        for labels, value in _EXPERT_SAMPLE.findall(text):
            expert = int(re.search(r'expert="(\d+)"', labels).group(1))
            counts[expert] = counts.get(expert, 0.0) + float(value)
        return counts

    def routing_of(self, action) -> tuple[object, dict[int, float]]:
        """(action's result, the routing it caused); nothing else may run on the server meanwhile."""
        before = self.routing()
        result = action()
        after = self.routing()
        return result, {e: after[e] - before.get(e, 0.0) for e in after}


def start(tmp_path_factory, model: Path, extra_args: list[str], env: dict[str, str] | None = None):
    """A context manager yielding a Server on `model` with the profiles above and three keys."""
    from unipool_serve.model_executor.config import UniPoolConfig

    folder = tmp_path_factory.mktemp("server")
    steering_dir, probe_dir = folder / "steering", folder / "probes"
    config = UniPoolConfig.from_pretrained(str(model))
    write_profiles(steering_dir, config)
    write_probes(probe_dir, config)
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    args = ["--model", str(model), "--steering-dir", str(steering_dir), "--probe-dir", str(probe_dir),
            "--api-key", API_KEY, "--api-key", f"{BOUND_KEY}=only-e5", "--api-key", f"{GATED_KEY}=only-e5@always+never",
            "--admin-key", ADMIN_KEY, "--grace-period", "20",
            "--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "32", "--served-model-name", "tiny",
            *extra_args]
    process = run_server(args, log, env={"UNIPOOL_METRICS_INTERVAL": "0.5", "VLLM_CPU_KVCACHE_SPACE": "1",
                                         **(env or {})})

    class _Started:
        def __enter__(self):
            return Server(process.__enter__(), steering_dir)

        def __exit__(self, *exc):
            return process.__exit__(*exc)

    return _Started()


# The server test_security.py, test_server.py and test_server_probes.py share (one start; SHARED_SERVERS in each).
# Every flag-gated route vLLM 0.32 has is on (dev mode, scale-out, the Cohere API: the security tests
# try every route of the live app) and prefix caching with 32-token blocks (the cache-poisoning tests).
# test_server.py's exact routing counts use prompts shorter than one block, which the prefix cache
# never serves; each test that uploads profiles uses names of its own and deletes them again.
MAIN_SERVER = "main"
MAIN_SERVER_ARGS = ["--enable-prefix-caching", "--block-size", "32", "--enable-scale-out",
                    "--enable-prompt-tokens-details"]  # usage.prompt_tokens_details.cached_tokens: prefix hits
MAIN_SERVER_ENV = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_ENABLE_COHERE_API": "1"}


@pytest.fixture(scope="module")
def server(tiny_model_factory, tmp_path_factory):
    model = tiny_model_factory("main-server-model", seed=3)
    return shared(MAIN_SERVER, lambda: start(tmp_path_factory, model, MAIN_SERVER_ARGS, env=MAIN_SERVER_ENV))
