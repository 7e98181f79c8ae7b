"""Soak: mixed load with profiles uploaded and deleted all the while; nothing fails, nothing leaks.

Streams and non-streams, steered under the loaded profiles and under ones that come and go every
two seconds, routing-capture requests, expert budgets, clients that vanish mid-stream. The RSS of
the API process, the engine core and its worker is sampled all along (every 10 s with --soak, every
2 s in the short run). At the end every engine steering row the churn took is free again
(unipool_steering_rows_in_use back to its value before the load). With `--soak MINUTES` it also
holds the memory bound: after the first fifth of the run (warm-up), no process grows by more than
5% over its size at the end of the warm-up. The short run (CI) is too short for a warm-up to end:
it records memory and checks everything else.
"""

from __future__ import annotations

import itertools
import random
import re
import threading
import time

import httpx
import psutil
import pytest

from server_process import ADMIN_KEY, API_KEY, BOUND_KEY, PROMPT

pytestmark = pytest.mark.server
HANG_GUARD_S = 600
MEMORY_GROWTH = 1.05


@pytest.fixture
def soak_minutes(request) -> float | None:
    return request.config.getoption("--soak")


def _rows_in_use(server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=60).text
    return float(re.search(r"^unipool_steering_rows_in_use (\S+)$", text, re.MULTILINE).group(1))


def _processes(server) -> dict[str, psutil.Process]:
    api = psutil.Process(server.proc.pid)
    engine = server.engine_processes()[0]
    return {"api": api, "engine_core": engine, **{f"worker{i}": w for i, w in enumerate(engine.children())}}


class Churn:
    """Uploads a new profile every `every` seconds and deletes the one before; `current` names the newest."""

    def __init__(self, server, model_dir, every: float):
        from unipool_serve.model_executor.config import UniPoolConfig

        self.server, self.every = server, every
        self.config = UniPoolConfig.from_pretrained(str(model_dir))
        self.current: str | None = None
        self.uploaded = self.deleted = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def profile(self, name: str, i: int) -> bytes:
        from unipool_serve.model_executor.steering.profile import SteeringProfile

        layers, experts = self.config.num_hidden_layers, self.config.num_experts
        return SteeringProfile.for_config(self.config, name=name, exclude={l: [i % experts] for l in range(layers)}
                                          ).to_bytes()

    def run(self) -> None:
        admin = httpx.Client(base_url=self.server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120)
        for i in itertools.count():
            if self.stop.is_set():
                break
            name, previous = f"churn-{i}", self.current
            resp = admin.post("/v1/steering/profiles", content=self.profile(name, i))
            if resp.status_code != 201:
                self.errors.append(f"upload {name}: {resp.status_code} {resp.text[:200]}")
            else:
                self.uploaded += 1
                self.current = name
            if previous is not None:
                resp = admin.delete(f"/v1/steering/profiles/{previous}")
                if resp.status_code != 200:
                    self.errors.append(f"delete {previous}: {resp.status_code} {resp.text[:200]}")
                self.deleted += 1
            self.stop.wait(self.every)
        if self.current is not None:
            admin.delete(f"/v1/steering/profiles/{self.current}")
            self.deleted += 1
        admin.close()


def _one_request(server, rng: random.Random, churn: Churn) -> str:
    """One request of the mix; returns its outcome: "ok", "raced" (its churn profile was deleted
    between choosing and sending: a 400 naming it) or a description of an error."""
    key = rng.choice([API_KEY, API_KEY, API_KEY, BOUND_KEY])
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": rng.choice([4, 16, 48]), "ignore_eos": True}
    steering = rng.choice([None, "no-e0", "push-e5", churn.current]) if key == API_KEY else None
    if steering:
        body["steering"] = steering
    kind = rng.choice(["stream", "stream", "plain", "capture", "budget", "vanish"])
    if kind == "capture":
        body["return_routed_experts"] = True
    if kind == "budget":
        body["expert_budget"] = {"top_k": 1}
    if kind in ("stream", "vanish"):
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as http:
        if not body.get("stream"):
            resp = http.post("/v1/completions", json=body)
            status, text = resp.status_code, resp.text
            if status == 200 and kind == "capture" and "routed_experts" not in resp.json()["choices"][0]:
                return "capture answer without routed_experts"
        else:
            with http.stream("POST", "/v1/completions", json=body) as resp:
                status, text = resp.status_code, ""
                for line in resp.iter_lines():
                    if kind == "vanish" and line.startswith("data: {"):
                        return "ok"  # the client goes away mid-stream
                    text = line
                if status != 200:
                    text = resp.read().decode(errors="replace")
    if status == 200:
        return "ok"
    if status == 400 and steering and steering.startswith("churn-") and "unknown steering profile" in text:
        return "raced"
    return f"{kind} {steering}: {status} {text[:200]}"


def test_soak_mixed_load_with_profile_churn(server, reliability_model, soak_minutes, report):
    minutes = soak_minutes or 0.5
    sample_every = 10.0 if soak_minutes else 2.0
    rows_before = _rows_in_use(server)
    processes = _processes(server)
    samples: list[dict] = []
    churn = Churn(server, reliability_model, every=2.0)
    stop = threading.Event()
    outcomes: dict[str, int] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            try:
                outcome = _one_request(server, rng, churn)
            except httpx.HTTPError as exc:
                outcome = f"transport error {type(exc).__name__}: {exc}"
            with lock:
                key = outcome if outcome in ("ok", "raced") else "error"
                outcomes[key] = outcomes.get(key, 0) + 1
                if key == "error":
                    errors.append(outcome)

    def sample() -> None:
        start = time.monotonic()
        while not stop.wait(sample_every):
            samples.append({"t": round(time.monotonic() - start, 1),
                            **{name: p.memory_info().rss for name, p in processes.items()}})

    churn.thread.start()
    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(8)]
    sampler = threading.Thread(target=sample)
    for thread in [*threads, sampler]:
        thread.start()
    stop.wait(minutes * 60)  # the soak's length: load runs meanwhile, nothing is asserted about progress
    stop.set()
    churn.stop.set()
    for thread in [*threads, sampler, churn.thread]:
        thread.join(HANG_GUARD_S)
    rows_after, deadline = _rows_in_use(server), time.monotonic() + HANG_GUARD_S
    while rows_after != rows_before and time.monotonic() < deadline:  # rows free once their requests end
        time.sleep(0.5)
        rows_after = _rows_in_use(server)

    growth = _growth_after_warmup(samples, list(processes))
    report(minutes=minutes, requests=outcomes, errors=len(errors), churned=churn.uploaded,
           rows_before=rows_before, rows_after=rows_after, samples=len(samples),
           rss_mib={name: [round(s[name] / 2**20) for s in samples[:: max(1, len(samples) // 12)]]
                    for name in processes},
           growth_after_warmup=growth)
    assert errors == [] and churn.errors == [], (errors + churn.errors)[:10]
    assert outcomes.get("ok", 0) > 0 and churn.uploaded > 0
    assert rows_after == rows_before
    if soak_minutes:
        assert all(g <= MEMORY_GROWTH for g in growth.values()), growth


def _growth_after_warmup(samples: list[dict], names: list[str]) -> dict[str, float]:
    """Per process: the largest RSS after the warm-up (the first fifth) over the RSS at its end."""
    if len(samples) < 5:
        return {}
    warm = len(samples) // 5
    return {name: round(max(s[name] for s in samples[warm:]) / samples[warm - 1][name], 4) for name in names}
