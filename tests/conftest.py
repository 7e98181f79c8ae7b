"""Shared fixtures. Tiny models are written once per session into a temp folder."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """write(name, seed=0, **config_overrides) -> folder; cached by (name, seed, overrides)."""
    from unipool_serve.demo.tiny_model import write_tiny_model

    cache = {}

    def write(name: str, seed: int = 0, **overrides):
        key = (name, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = write_tiny_model(tmp_path_factory.mktemp(name), seed=seed, **overrides)
        return cache[key]

    return write


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test: tiny models gain nothing from two, and on a busy 2-core
    machine OpenMP's spin-waiting made two threads several times slower (docs/demo-model.md)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_addoption(parser):
    parser.getgroup("unipool engine").addoption(
        "--all-families", action="store_true",
        help="tests/engine/test_families_engine.py on every vLLM MoE family, not only CI's subset")
    parser.getgroup("unipool ray").addoption(
        "--ray", action="store_true",
        help="tests/server/test_ray_pipeline.py: two local Ray nodes, pipeline parallel 2 across them "
             "(needs `ray` installed beside the project, see docs/deploy.md; minutes)")
    group = parser.getgroup("unipool reliability")
    group.addoption("--reliability-full", action="store_true",
                    help="tests/reliability at full size (minutes of load, >= 1,000 fuzz cases per generation route)")
    group.addoption("--soak", type=float, metavar="MINUTES",
                    help="tests/reliability/test_soak.py for MINUTES of mixed load with profile churn, and its memory "
                         "bound (without it: a short run that checks errors and steering rows only)")
    group.addoption("--reliability-report", metavar="PATH",
                    help="write what each reliability test held (requests, errors, leaks) as JSON to PATH")
    group = parser.getgroup("unipool image")
    group.addoption("--image", metavar="REF",
                    help="run tests/image against this built CPU image (root, buildah; `make image-test`); "
                         "without it they are skipped")
    group.addoption("--image-report", metavar="PATH", help="write what tests/image measured as JSON to PATH")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After a test's own teardown: stop the servers shared across modules (server_launcher.shared)
    that the next test's module does not use (SHARED_SERVERS, a tuple of names); all after the last test."""
    result = yield
    from server_launcher import stop_shared

    stop_shared(keep=getattr(getattr(nextitem, "module", None), "SHARED_SERVERS", ()) if nextitem else ())
    return result


def pytest_sessionfinish(session, exitstatus):
    """Nothing shared outlives the session (an interrupted run included)."""
    from server_launcher import stop_shared

    stop_shared()
