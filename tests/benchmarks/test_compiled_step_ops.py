"""The compiled decode step of our model runs no op the CPU leaves outside Inductor's kernels
beyond vLLM's own (benchmarks/profile_compiled_step.py, smallest shape, one variant).

A regression guard without a clock: the ops the torch profiler sees in a compiled step where
nobody steers. A full sort per layer (the routing), an index_put with accumulate (the counts),
or a Python custom op around vLLM's MoE kernel each cost a tiny step 5-10% on the CPU, and
came back unnoticed when only timings watched them (docs/benchmarks.md, "The compiled step's
gap"). Op names and calls only; no time is asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.engine
TOKENS = 4
FORBIDDEN = ("aten::sort", "aten::index_put_", "aten::_index_put_impl_", "unipool::cpu_pool_moe")


def test_the_compiled_idle_step_runs_vllms_moe_kernel_and_no_sort_or_scatter(tmp_path):
    out = tmp_path / "profile.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "profile_compiled_step.py"), "--shape", "smoke",
           "--variants", "unipool-global", "--tokens", str(TOKENS), "--force-noisy", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ops = {o["op"]: o["calls"] for o in json.loads(out.read_text())["results"]["unipool-global"]["ops"]}
    layers = 2  # the smoke shape
    assert ops.get("_C::cpu_fused_moe") == TOKENS * layers, ops  # vLLM's kernel, called from the graph
    assert ops.get("## Call CompiledFxGraph None ##") == TOKENS  # every step compiled, one graph
    assert not [op for op in FORBIDDEN if op in ops], {op: ops[op] for op in FORBIDDEN if op in ops}
