"""benchmarks/bench_pool_decode.py --smoke still runs end to end (tiny stack, CPU interpreter, eager only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_pool_decode_smoke_writes_a_result(tmp_path):
    out = tmp_path / "decode.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_pool_decode.py"), "--smoke", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["smoke"] is True and data["graph_replay"] is False and data["copy_bytes_per_s"] > 0
    shape = data["shape"]
    assert [row["T"] for row in data["results"]] == [1, 3]
    for row in data["results"]:
        fused = row["impls"]["fused"]
        assert "graph_ms" not in fused and fused["eager_ms"] > 0  # no CUDA: no graph, not faked
        assert len(fused["u_per_layer"]) == shape["L"]
        assert all(1 <= u <= min(shape["M"], row["T"] * shape["k"]) for u in fused["u_per_layer"])
        # fp32 on the interpreter: the same routing as the torch reference, layer after layer.
        assert fused["routing_agreement"] == 1.0 and fused["max_abs_err"] < 1e-4
        assert 0 < fused["bound_ms"] < fused["bound_all_ms"]
