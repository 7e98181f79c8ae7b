"""Where the benchmark scripts get the kernels from.

- import_kernels(repo): the installed `unipool_serve.kernels` if present, else the
  repository's kernels/ folder (the benchmarks need torch and triton only, no vLLM).
- load_baseline(path): `fused_pool_moe` from another copy of kernels/, e.g. main's,
  to time today's kernel side by side with this one in the same run.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path


def import_kernels(repo):
    """The installed unipool_serve.kernels if present, else the repository's kernels/ folder."""
    try:
        from unipool_serve import kernels
    except ImportError:
        sys.path.insert(0, str(repo))
        import kernels
    return kernels


def load_baseline(path, name="baseline_kernels"):
    """fused_pool_moe from another copy of kernels/ (e.g. main's, to compare with today's kernel)."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py", submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return importlib.import_module(f"{name}.fused_moe").fused_pool_moe
