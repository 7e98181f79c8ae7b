"""benchmarks/run_serving.py --smoke still runs end to end: one server, one point, one comparison.

Checks the shape of what it writes, never the timings (the machine is shared and noisy), so it
does not wait for other vLLM processes on the machine to end first (--wait-quiet 0).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.engine, pytest.mark.server]


def test_serving_harness_smoke(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "benchmarks" / "run_serving.py"), "--smoke", "--out-dir", str(out),
           "--work-dir", str(tmp_path / "work"), "--wait-quiet", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    data = json.loads((out / "serving-smoke.json").read_text())
    assert [s["server"] for s in data["servers"]] == ["unipool-serve"]
    kinds = sorted(p["kind"] for p in data["points"])
    assert kinds == ["steering-off", "steering-on", "sweep"]
    for p in data["points"]:
        assert p["completed"] == p["num_prompts"] and p["output_throughput"] > 0
        assert p["total_output_tokens"] == p["num_prompts"] * data["meta"]["workload"]["output_len"]
        assert p["rss_peak_bytes"] > 0
    steered = next(p for p in data["points"] if p["kind"] == "steering-on")["steered"]
    assert 0 < steered < data["points"][0]["num_prompts"]
    assert [r["a"] for r in data["ratios"]] == ["unipool-serve:steering-on"]
    assert data["servers"][0]["kv_tokens"] > 0 and data["setup"]["weights"]["unipool"]["experts"] > 0
    ul = data["reference"]["u_l"]["unipool"]
    assert all(1 <= u["u_mean"] <= min(u["pool_size"], u["batch"] * u["top_k"]) for u in ul)

    doc = (out / "benchmarks.md").read_text()
    assert "<!-- serving-harness:begin -->" in doc and "<!-- serving-harness:end -->" in doc
    assert {f"serving-smoke-{n}.png" for n in ("sweep", "ratios", "experts-per-step")} <= {p.name for p in out.iterdir()}
