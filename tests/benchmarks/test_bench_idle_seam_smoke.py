"""benchmarks/bench_idle_seam.py in its smallest mode (one tiny eager engine): it runs end to end, writes
its JSON, and each mode ran on the variant it names. No timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.engine


def test_bench_idle_seam_smoke(tmp_path):
    out = tmp_path / "idle-seam.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_idle_seam.py"), "--smoke", "--force-noisy",
           "--models", "unipool-global", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {"args", "shape", "noisy", "quiet_before", "quiet_after", "machine", "statistic", "results"} <= set(data)
    assert {"load_before", "cpu_model", "isa", "busy_processes"} <= set(data["quiet_before"])
    (engine,) = data["results"]
    assert engine["model"] == "unipool-global" and engine["layout"]["pinned"]
    assert all(p.get("threads_off_intended") == 0 for p in engine["pin_check_at_end"].values())
    assert set(engine["summary"]) == {"batched", "single"}
    for per_mode in engine["summary"].values():
        assert set(per_mode) == {"idle", "seam", "half-steered", "probed"}
        assert {"ratio_vs_idle_wall", "ratio_vs_idle_worker_cpu"} <= set(per_mode["seam"])
    # idle: only the plain variant; seam (IdleSteps.always_read) and probed: only the model
    assert engine["steps_as_named"]
    rows = engine["measurements"]
    assert len(rows) == 2 * 4 * 2  # rounds x modes x (batched, single)
    assert all({"wall_s", "cpu_s", "steps", "output_tokens"} <= set(r) for r in rows)
