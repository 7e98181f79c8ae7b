"""One server process at a time: start, wait until it answers, sample its memory, stop cleanly.

A server runs in its own process group (start_new_session), so stopping it reaches
the API process, vLLM's engine core and any worker: SIGTERM to the group, then
SIGKILL after a grace period. The port is checked free before a start and after a
stop. A sampler thread records the RSS of the whole process tree every 0.2 s.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class ServerSpec:
    """What to start: `unipool-serve` or vLLM's own OpenAI server, with engine arguments and env."""

    name: str
    kind: str  # "unipool-serve" | "vllm"
    model: Path
    engine_args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    steering_dir: Path | None = None

    @property
    def served_name(self) -> str:
        return self.model.name  # the model folder's name: unipool, vanilla, mixtral

    def command(self, port: int) -> list[str]:
        common = ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", self.served_name,
                  *self.engine_args]
        if self.kind == "unipool-serve":
            steer = ["--steering-dir", str(self.steering_dir)] if self.steering_dir else []
            return [str(VENV_BIN / "unipool-serve"), "--model", str(self.model), *steer, *common]
        if self.kind == "vllm":
            return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model), *common]
        raise ValueError(f"unknown server kind {self.kind!r}")

    def environment(self) -> dict[str, str]:
        env = {**os.environ, **self.env}
        if self.kind == "vllm":
            env.setdefault("VLLM_PLUGINS", "unipool")  # registers our architecture, nothing else
        return {k: v for k, v in env.items() if v is not None}


class MemorySampler(threading.Thread):
    """Peak RSS (bytes) of a process and all its descendants, sampled every `period` s."""

    def __init__(self, pid: int, period: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.period = psutil.Process(pid), period
        self.peak = self.last = 0
        self.peak_since_mark = 0
        self._stop = threading.Event()

    def tree_rss(self) -> int:
        total = 0
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def mark(self) -> None:
        self.peak_since_mark = self.last

    def run(self) -> None:
        while not self._stop.is_set():
            self.last = self.tree_rss()
            self.peak = max(self.peak, self.last)
            self.peak_since_mark = max(self.peak_since_mark, self.last)
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()


class Server:
    """A running server; use as a context manager."""

    def __init__(self, spec: ServerSpec, log_dir: Path, *, port: int | None = None, start_timeout: float = 600):
        self.spec, self.port = spec, port or free_port()
        self.log_path = Path(log_dir) / f"{spec.name}.log"
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.sampler: MemorySampler | None = None
        self.start_seconds = float("nan")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        if port_in_use(self.port):
            raise RuntimeError(f"port {self.port} is already in use")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.spec.command(self.port), env=self.spec.environment(), stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.sampler = MemorySampler(self.proc.pid)
        self.sampler.start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.perf_counter() - t0
        return self

    def _wait_ready(self) -> None:
        # /ready exists on unipool-serve; vLLM's own server is ready once /v1/models answers.
        path = "/ready" if self.spec.kind == "unipool-serve" else "/v1/models"
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"server {self.spec.name} exited with {self.proc.returncode}:\n{tail}")
            try:
                if httpx.get(self.base_url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server {self.spec.name} not ready after {self.start_timeout} s (log {self.log_path})")

    def metrics_text(self) -> str:
        return httpx.get(self.base_url + "/metrics", timeout=10).text

    def stop(self, grace: float = 30) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # SIGTERM to the API process only: it drains and stops its engine itself
            # (a group-wide SIGTERM makes the engine core die under the API process).
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:  # anything left in the group (engine core, workers)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        if self.sampler is not None:
            self.sampler.stop()
        deadline = time.monotonic() + 30
        while port_in_use(self.port) and time.monotonic() < deadline:
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        self.stop()


def other_engines_running() -> int:
    """How many vLLM engine processes (not ours: neither this process nor the servers it started) are
    alive on this machine right now."""
    me = psutil.Process()
    ours = {me.pid, *(child.pid for child in me.children(recursive=True))}
    count = 0
    for proc in psutil.process_iter(["pid", "cmdline", "name"]):
        try:
            line = " ".join(proc.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if proc.info["pid"] not in ours and ("vllm" in line or "unipool-serve" in line or "VLLM::" in (proc.info["name"] or "")):
            count += 1
    return count
