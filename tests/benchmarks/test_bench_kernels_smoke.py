"""benchmarks/bench_kernels.py --smoke still runs end to end (tiny shapes, CPU interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_kernels_smoke_writes_a_result(tmp_path):
    out = tmp_path / "kernels.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_kernels.py"), "--smoke", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["smoke"] is True and data["device"] and data["date"]
    assert data["matmul_flops_per_s"] > 0 and data["copy_bytes_per_s"] > 0
    assert [row["T"] for row in data["results"]] == [1, 5]
    for row in data["results"]:
        assert 1 <= row["touched"] <= min(row["M"], row["T"] * row["k"]) and row["bound_ms"] > 0
        fused = row["impls"]["fused"]
        assert fused["ms"] > 0 and fused["max_abs_err"] < 1e-4, fused
        assert row["impls"]["torch-loop"]["max_abs_err"] == 0.0
