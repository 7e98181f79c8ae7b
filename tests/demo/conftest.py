"""Fixtures for the bundled demo model (models/unipool-demo), loaded once per session."""

from __future__ import annotations

import pytest
import torch

from unipool_serve.demo.eval import DEMO_MODEL_DIR


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Greedy decoding of a small model is fastest (and steadiest on a busy machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_dir():
    return DEMO_MODEL_DIR


@pytest.fixture(scope="session")
def demo(demo_dir):
    """(model, tokenizer) of the shipped demo folder through the reference model."""
    from unipool_serve.demo.eval import load_demo

    return load_demo(demo_dir)


@pytest.fixture(scope="session")
def demo_profiles(demo, demo_dir):
    from unipool_serve.model_executor.steering.profile import SteeringProfile

    model, _ = demo
    return {p.stem: SteeringProfile.load(p, model.config) for p in sorted((demo_dir / "steering").glob("*.safetensors"))}
