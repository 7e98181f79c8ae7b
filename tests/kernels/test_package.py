"""The package imports without triton and exports its kernels lazily."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from unipool_serve import kernels


def test_package_import_does_not_import_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import sys, unipool_serve.kernels as k; k.pool_moe; k.route_with_table; print('triton' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_lazy_exports():
    from unipool_serve.kernels.fused_moe import fused_pool_moe
    from unipool_serve.kernels.routing import fused_route

    assert kernels.fused_route is fused_route and kernels.fused_pool_moe is fused_pool_moe
    with pytest.raises(AttributeError):
        kernels.no_such_kernel  # noqa: B018
