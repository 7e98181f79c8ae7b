"""benchmarks/bench_pipeline_memory.py --smoke still runs end to end: the global pool at PP=1 and PP=2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.engine


def test_bench_pipeline_memory_smoke(tmp_path):
    out = tmp_path / "pipeline-memory.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_pipeline_memory.py"), "--smoke", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all(r["bytes"] == r["closed_form"] for r in rows)
    assert all(r["pp2_total_over_pp1"] == 2.0 for r in rows)  # the global pool, stored on both stages
