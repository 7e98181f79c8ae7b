"""bench_expert_budgets.py in its smallest mode: it runs end to end and writes its JSON (no timing asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.engine


def test_smoke_writes_every_part(tmp_path):
    out = tmp_path / "budgets.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_expert_budgets.py"), "--smoke",
                             "--out", str(out)], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [r["pool_size"] for r in data["quality_vs_pool_size"]] == [16, 8]
    assert [r["top_k"] for r in data["speed_vs_budget"]] == [4, 2, 1]
    assert data["memory_vs_pool_size"][1]["pool_bytes"] * 2 == data["memory_vs_pool_size"][0]["pool_bytes"]
