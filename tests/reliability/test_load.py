"""Concurrent streaming load with mixed profiles, and clients that vanish mid-stream."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import httpx
import pytest

from server_process import API_KEY, BOUND_KEY, PROMPT

pytestmark = pytest.mark.server
TOKENS = 16


def _running(server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=60).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:num_requests_running"))


def _settled(server) -> float:
    """vllm:num_requests_running once it stops moving: aborts of vanished clients land asynchronously,
    so wait for the gauge (a bound for failure, not a timing assumption: it settles within seconds)."""
    running, deadline = _running(server), time.monotonic() + 600
    while running and time.monotonic() < deadline:
        time.sleep(0.5)
        running = _running(server)
    return running


def _stream_once(server, key: str, steering: str | None) -> tuple[int, int]:
    """One streaming completion; (HTTP status, completion tokens the final usage chunk reports)."""
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": TOKENS, "ignore_eos": True, "stream": True,
            "temperature": 0, "stream_options": {"include_usage": True}}
    if steering:
        body["steering"] = steering
    tokens = 0
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as http:
        with http.stream("POST", "/v1/completions", json=body) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    tokens = (json.loads(line[6:]).get("usage") or {}).get("completion_tokens", tokens)
            return resp.status_code, tokens


def test_concurrent_streams_with_mixed_profiles(server, full, report):
    clients, rounds, seconds = (128, 1, 180) if full else (32, 3, 0)
    mix = [(API_KEY, None), (API_KEY, "no-e0"), (API_KEY, "push-e5"), (BOUND_KEY, None)]
    outcomes: Counter = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(i: int):
        key, steering = mix[i % len(mix)]
        for done in range(1, 1 << 30):
            try:
                status, tokens = _stream_once(server, key, steering)
                outcome = "ok" if status == 200 and tokens == TOKENS else f"bad:{status}:{tokens}"
            except httpx.HTTPError as exc:
                outcome = f"error:{type(exc).__name__}"
            with lock:
                outcomes[outcome] += 1
            if done >= rounds and time.monotonic() >= deadline:
                return

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    running = _settled(server)
    errors = sum(n for outcome, n in outcomes.items() if outcome != "ok")
    report(clients=clients, rounds=rounds, seconds=seconds, requests=sum(outcomes.values()), errors=errors,
           running_after=running, outcomes=dict(outcomes))
    assert errors == 0, outcomes
    assert running == 0


def test_mass_disconnects_leak_nothing(server, full, report):
    clients = 200 if full else 50

    def drop_after_first_chunk():
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 200, "stream": True, "ignore_eos": True}
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300) as http:
            with http.stream("POST", "/v1/completions", json=body) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: {"):
                        break  # leaving the blocks closes the connection mid-stream

    threads = [threading.Thread(target=drop_after_first_chunk) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    running = _settled(server)
    status, tokens = _stream_once(server, API_KEY, None)  # still serving
    report(clients=clients, running_after=running, next_request=(status, tokens))
    assert running == 0 and (status, tokens) == (200, TOKENS)
