"""Shutdown under load drains cleanly, however it is asked for; a dead engine makes the API answer 503
and /health fail, never hang; a dead API process leaves no engine behind; an engine that cannot start
ends the server with its error.

Each test starts (and ends) its own server. "Running" is an observed event here (the API has
admitted the request, with the engine frozen so that nothing can finish), never a wait on the clock.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from server_launcher import free_port, start_streams
from server_process import API_KEY, PROMPT, start

pytestmark = pytest.mark.server
TOKENS = 120


def _streams(server, count: int):
    """Start `count` streaming completions; returns (all-first-chunks semaphore, results list, threads)."""
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": TOKENS, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    return start_streams(server.url, count, body, {"Authorization": f"Bearer {API_KEY}"})


# What must never appear in a clean stop's log: errors, a process vLLM had to kill, leak reports.
UNCLEAN = re.compile(r"\bERROR\b|Traceback|force killing|leaked|nanobind|died unexpectedly")
STOPS = {
    "SIGTERM to the server (Kubernetes, docker stop)": lambda proc: proc.send_signal(signal.SIGTERM),
    "SIGTERM to its process group (systemd)": lambda proc: os.killpg(proc.pid, signal.SIGTERM),
    "SIGINT to its process group (Ctrl-C)": lambda proc: os.killpg(proc.pid, signal.SIGINT),
}


@pytest.mark.parametrize("stop", list(STOPS))
def test_a_stop_under_load_drains_and_exits_zero(stop, tiny_model_factory, tmp_path_factory, full, report):
    streams = 32 if full else 8
    with start(tmp_path_factory, tiny_model_factory("lifecycle-model", seed=2), []) as server:
        # a request the enforcement point refuses first: it must not stay registered as running
        refused = httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                             json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2, "steering": "no-such"},
                             timeout=120)
        assert refused.status_code == 400, refused.text
        before = server.admitted("none")
        # The engine takes no step until the drain has been seen, so every stream is still running at
        # SIGTERM on any machine: admitted by the API (observed on its counter), none finished.
        with server.engine_frozen():
            _, results, threads = _streams(server, streams)
            server.wait_admitted("none", before + streams)
            log_before = len(server.log.read_text(errors="replace"))
            STOPS[stop](server.proc)  # the server runs in a session of its own: its group is its pid
            ready, deadline = 200, time.monotonic() + 300
            while ready == 200 and time.monotonic() < deadline:  # the drain flag is set by vLLM's shutdown thread
                ready = httpx.get(f"{server.url}/ready", timeout=10).status_code
            late = httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                              json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2}, timeout=120)
        for t in threads:
            t.join(300)
        code = server.proc.wait(timeout=120)
        shutdown_log = server.log.read_text(errors="replace")[log_before:]
    finished = sum(1 for status, tokens in results if status == 200 and tokens == TOKENS)
    error_lines = [line for line in shutdown_log.splitlines() if UNCLEAN.search(line)]
    report(stop=stop, streams=streams, finished=finished, ready_during_drain=ready, late_request=late.status_code,
           retry_after=late.headers.get("retry-after"), exit_code=code, error_lines=len(error_lines))
    assert ready == 503
    assert late.status_code == 503 and late.headers.get("retry-after") and late.json()["error"]["message"]
    assert finished == streams, results
    assert code == 0
    assert error_lines == [], error_lines[:10]


def test_a_dead_engine_gives_503_and_a_failing_health_check(tiny_model_factory, tmp_path_factory, report):
    with start(tmp_path_factory, tiny_model_factory("lifecycle-model", seed=2), []) as server:
        engines = server.engine_processes()
        assert engines, "no engine process found"
        for engine in engines:
            engine.kill()
        health, completion, deadline = 200, None, time.monotonic() + 600
        while health == 200 and time.monotonic() < deadline:  # the API notices the engine's death
            try:
                health = httpx.get(f"{server.url}/health", timeout=30).status_code
            except httpx.TransportError:
                health = "refused"  # the API process has exited: also not healthy
        try:
            completion = httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                                    json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2}, timeout=120).status_code
        except httpx.TransportError:
            completion = "refused"
    report(health_after_kill=health, completion_after_kill=completion)
    assert health != 200
    assert completion in (503, "refused")


def test_a_killed_api_process_leaves_no_engine_behind(tiny_model_factory, tmp_path_factory, report):
    import psutil

    with start(tmp_path_factory, tiny_model_factory("lifecycle-model", seed=2), []) as server:
        children = psutil.Process(server.proc.pid).children(recursive=True)  # engine core, worker, tracker
        assert server.engine_processes(), children
        server.proc.kill()  # SIGKILL: no shutdown of its own runs
        server.proc.wait(timeout=60)
        gone, alive = psutil.wait_procs(children, timeout=120)  # a bound for a hang: they leave in seconds
    report(children=len(children), left_behind=len(alive))
    assert alive == [], [p.name() for p in alive]


def test_an_engine_that_cannot_start_ends_the_server_with_its_error(tiny_model_factory, tmp_path, report):
    """A KV cache smaller than one block: vLLM's engine core fails at start and exits through
    multiprocessing's exit, which SIGTERMs its worker and joins it. The worker ignores group signals
    while the engine core lives (model_executor/lifecycle.py), so without the engine core's release the
    join, and the server, waited forever."""
    import psutil

    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "unipool_serve.server.cli", "--model", str(tiny_model_factory("lifecycle-model", seed=2)),
           "--enforce-eager", "--kv-cache-memory-bytes", "1024", "--host", "127.0.0.1", "--port", str(free_port())]
    # VLLM_CPU_KVCACHE_SPACE (set by other tests of the session) would override the explicit KV size
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        code = proc.wait(timeout=400)  # a bound for the hang (vLLM's own engine-start timeout is 600 s)
    except subprocess.TimeoutExpired:
        code = "hung"
    group = [p for p in psutil.process_iter() if _group_of(p.pid) == proc.pid]
    gone, left = psutil.wait_procs(group, timeout=60)
    if code == "hung" or left:
        os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    report(exit_code=code, left_behind=len(left))
    assert code not in ("hung", 0), text[-3000:]
    assert "No available memory for the cache blocks" in text, text[-3000:]
    assert left == [], [p.name() for p in left]


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None
