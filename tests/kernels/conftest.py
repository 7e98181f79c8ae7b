"""Kernel tests: real Triton on CUDA, the Triton interpreter on CPU.

Triton picks interpreter or compiler when it is imported and when each kernel is
decorated, so TRITON_INTERPRET=1 must be set before the first `import triton`.
On a machine without CUDA this conftest sets it if triton is not imported yet. The
variable then stays set for the rest of the process, which the other test folders
tolerate: vLLM's CPU build disables Triton whatever the variable says, and no CPU
backend (model_executor/moe_backend.py) hands tensors to Triton.

If triton was already imported without the interpreter (an earlier folder imported
vLLM), the kernels cannot run in this process: their tests are deselected here and
test_fresh_process.py runs this folder in a child pytest instead, so a full run
still executes (and fails on) every kernel test.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # kernel_checks.py sits beside the tests (folders are not packages)

from kernel_checks import kernels_runnable_here  # noqa: E402

FRESH_PROCESS_TEST = "test_fresh_process.py"


def pytest_collection_modifyitems(config, items):
    runnable = kernels_runnable_here()
    keep, drop = [], []
    for item in items:
        path = Path(str(item.fspath))
        if HERE not in path.parents:
            keep.append(item)
        elif (path.name == FRESH_PROCESS_TEST) != runnable:
            keep.append(item)
        else:
            drop.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def poisoned_buffers(monkeypatch):
    """Scratch buffers start as NaN and the align's index buffers as -7, so anything read
    before it is written, or never written, shows up."""
    from unipool_serve.kernels import fused_align, fused_moe  # after the TRITON_INTERPRET decision

    monkeypatch.setattr(fused_moe, "_workspace",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))
    monkeypatch.setattr(fused_align, "_index_buffer",
                        lambda size, device: torch.full((size,), -7, dtype=torch.int32, device=device))
