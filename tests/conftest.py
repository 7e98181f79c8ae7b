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


def pytest_addoption(parser):
    parser.getgroup("unipool engine").addoption(
        "--all-families", action="store_true",
        help="tests/engine/test_families_engine.py on every vLLM MoE family, not only CI's subset")
    group = parser.getgroup("unipool reliability")
    group.addoption("--reliability-full", action="store_true",
                    help="tests/reliability at full size (minutes of load, >= 1,000 fuzz cases per generation route)")
    group.addoption("--reliability-report", metavar="PATH",
                    help="write what each reliability test held (requests, errors, leaks) as JSON to PATH")
    group = parser.getgroup("unipool image")
    group.addoption("--image", metavar="REF",
                    help="run tests/image against this built CPU image (root, buildah; `make image-test`); "
                         "without it they are skipped")
    group.addoption("--image-report", metavar="PATH", help="write what tests/image measured as JSON to PATH")
