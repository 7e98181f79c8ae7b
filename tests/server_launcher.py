"""Start a real `unipool-serve` process for a test module and wait until /ready says 200.

`shared(name, start)` keeps one server (any context manager's value) for several test modules in
a row: the first module that asks starts it, and tests/conftest.py stops it as soon as the next
test to run belongs to a module that does not list `name` in its SHARED_SERVERS.
"""

from __future__ import annotations

import contextlib
import json
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

START_TIMEOUT = 1800  # a bound for a hung start, not an expectation: a loaded 2-core machine took over 420 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    log: Path
    ready_codes: list[int] = field(default_factory=list)

    def tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


@contextlib.contextmanager
def run_server(args: list[str], log: Path, env: dict[str, str] | None = None, python: str = sys.executable,
               cwd: str | None = None):
    """`unipool-serve ARGS --host 127.0.0.1 --port <free>`; yields a ServerProcess once ready, kills it after."""
    port = free_port()
    cmd = [python, "-m", "unipool_serve.server.cli", *args, "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True, cwd=cwd)
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"unipool-serve exited with {proc.returncode}:\n{server.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"unipool-serve not ready after {START_TIMEOUT}s:\n{server.tail()}")
            try:
                code = httpx.get(f"{server.url}/ready", timeout=5).status_code
                server.ready_codes.append(code)
                if code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


_SHARED: dict[str, tuple[contextlib.ExitStack, object]] = {}


def shared(name: str, start):
    """The value of `start()` (a context manager) entered once under `name`, for every module that lists
    `name` in its SHARED_SERVERS; stopped by stop_shared (tests/conftest.py calls it)."""
    if name not in _SHARED:
        stack = contextlib.ExitStack()
        try:
            value = stack.enter_context(start())
        except BaseException:
            stack.close()
            raise
        _SHARED[name] = (stack, value)
    return _SHARED[name][1]


def stop_shared(keep=()) -> None:
    """Stop every shared server whose name is not in `keep`."""
    for name in [n for n in _SHARED if n not in keep]:
        stack, _ = _SHARED.pop(name)
        stack.close()


def start_streams(url: str, count: int, body: dict, headers: dict[str, str] | None = None):
    """Start `count` streaming completions of `body` (with `stream_options.include_usage`).

    Returns (started, results, threads): `started` is released once per stream at its first
    chunk (an observed "running in the engine"), or at its end if none came; `results` gets
    (status, completion tokens of the usage chunk) per stream, or the transport error's name.
    """
    started, results, lock = threading.Semaphore(0), [], threading.Lock()

    def run():
        tokens, status, signalled = None, None, False
        try:
            with httpx.Client(base_url=url, headers=headers or {}, timeout=300) as client:
                with client.stream("POST", "/v1/completions", json=body) as resp:
                    status = resp.status_code
                    for line in resp.iter_lines():
                        if line.startswith("data: {"):
                            if not signalled:
                                signalled = True
                                started.release()
                            tokens = (json.loads(line[6:]).get("usage") or {}).get("completion_tokens", tokens)
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        finally:
            if not signalled:
                started.release()
            with lock:
                results.append((status, tokens))

    threads = [threading.Thread(target=run) for _ in range(count)]
    for t in threads:
        t.start()
    return started, results, threads
