"""Reliability suite: a real server under load, hostile input, shutdown and engine death.

Short by default (CI); `pytest tests/reliability --reliability-full` runs the long version.
Every test reports what it held (requests, errors, leaks) through the `report` fixture:
printed at the end of the session, written as JSON with --reliability-report PATH.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))  # server_process.py

from server_process import start  # noqa: E402

_REPORT: dict[str, dict] = {}


@pytest.fixture(scope="session")
def full(request) -> bool:
    return bool(request.config.getoption("--reliability-full"))


@pytest.fixture
def report(request):
    """report(**numbers): what this test held, keyed by its name."""
    def record(**numbers):
        _REPORT[request.node.name] = numbers
    return record


def pytest_sessionfinish(session, exitstatus):
    if not _REPORT:
        return
    path = session.config.getoption("--reliability-report")
    mode = "full" if session.config.getoption("--reliability-full") else "short"
    if path:
        Path(path).write_text(json.dumps({"mode": mode, "tests": _REPORT}, indent=2) + "\n")
    lines = [f"  {name}: {numbers}" for name, numbers in sorted(_REPORT.items())]
    print(f"\nreliability ({mode}):\n" + "\n".join(lines))


@pytest.fixture(scope="session")
def reliability_model(tiny_model_factory):
    # A tokenizer that spells every byte, as in production: with an ASCII-only one, a structured-output
    # grammar that requires "é" leaves no token to sample, and vLLM 0.32 ends the request with a 500.
    return tiny_model_factory("reliability-model", seed=1, every_byte_tokenizer=True)


@pytest.fixture(scope="package")  # this folder is a package for that: the server stops after its last test
def server(reliability_model, tmp_path_factory):
    """One server for the hostile-input, load, slow-client and soak tests, one after another: each
    measures what it checks from its own start (tracebacks, running requests, memory, rows) and leaves
    the profiles as it found them. The stop tests start their own, since they stop it."""
    model = reliability_model
    # deadlines against slow clients shorter than the defaults, so tests/reliability/test_slow_clients.py
    # sees them act (the load tests' clients send and read at once)
    deadlines = ["--header-timeout", "5", "--body-timeout", "5", "--send-timeout", "20"]
    with start(tmp_path_factory, model, ["--enable-prefix-caching", "--max-num-seqs", "128", *deadlines]) as s:
        yield s
