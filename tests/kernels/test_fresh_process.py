"""Runs this folder in a child pytest when the parent imported triton too early.

conftest.py selects this test only when the kernels cannot run in the current
process (triton imported before TRITON_INTERPRET could be set); otherwise the
kernel tests run directly and this one is deselected.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def test_kernel_tests_in_a_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", str(HERE), "-q", "-p", "no:cacheprovider"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE.parents[1], timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
