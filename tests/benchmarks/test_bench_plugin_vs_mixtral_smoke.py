"""benchmarks/bench_plugin_vs_mixtral.py in its smallest mode, one variant (our global pool: one tiny eager engine, the quickest to start): it runs
end to end and writes its JSON. No timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.engine


def test_bench_plugin_vs_mixtral_smoke(tmp_path):
    out = tmp_path / "plugin-vs-mixtral.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_plugin_vs_mixtral.py"), "--smoke", "--force-noisy",
           "--variants", "unipool-global", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {"args", "shape", "noisy", "quiet_before", "quiet_after", "machine", "statistic", "engines",
            "results"} <= set(data)
    assert data["shape"]["name"] == "smoke"
    (engine,) = data["engines"]
    assert {"batch_times_s", "batch_cpu_s", "single_request_s", "batch_worker_cpu_s_per_token", "layout",
            "pin_check"} <= set(engine)
    assert engine["layout"]["pinned"] and engine["processes_left_after_stop"] == []
    (result,) = data["results"]
    assert result["variant"] == "unipool-global"
    assert {"median", "min", "max", "n"} <= set(result["batch_output_tok_s"])
    assert {"ratio_vs_mixtral", "ratio_vs_mixtral_per_round", "batch_worker_cpu_s_per_token"} <= set(result)
    assert result["ratio_vs_mixtral"] is None  # Mixtral not run
