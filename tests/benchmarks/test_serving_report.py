"""The serving harness's report (benchmarks/serving/report.py) on made-up points: the `--goals` ratios
pair unipool-serve with vLLM's Mixtral repeat by repeat at every concurrency, in throughput (higher is
better) and p99 ITL (lower is better), and its section goes between its own markers."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from serving.report import markers, markdown, ratios, update_doc  # noqa: E402


def _point(server: str, concurrency: int, repeat: int, tput: float, itl99: float, kind: str = "sweep") -> dict:
    return {"server": server, "model": "m", "client": "vllm bench serve", "kind": kind, "concurrency": concurrency,
            "repeat": repeat, "num_prompts": 8, "output_throughput": tput, "median_ttft_ms": 1.0, "p99_ttft_ms": 2.0,
            "median_itl_ms": 1.0, "p99_itl_ms": itl99, "rss_peak_bytes": 2**20}


def _data() -> dict:
    points = []
    for repeat, (ours, theirs) in enumerate(((100.0, 80.0), (90.0, 100.0))):
        for c in (1, 16):
            points.append(_point("unipool-serve", c, repeat, ours * c, 10.0 + repeat))
            points.append(_point("vllm-mixtral", c, repeat, theirs * c, 10.0))
        points.append(_point("budget-unipool", 16, repeat, 150.0, 1.0, kind="budget"))
        points.append(_point("budget-mixtral", 16, repeat, 100.0, 1.0, kind="budget"))
    mode = {"name": "goals", "concurrencies": [1, 16], "compare_at": 16, "budget_at": 16, "budget_kv_seqs": 2,
            "repeats": 2, "doc_section": "serving-goals"}
    meta = {"command": "x", "date": "d", "machine_text": "m", "caveats": [], "settings_text": "s",
            "shape": {"layers": 2, "experts_per_layer": 4, "pool_experts": 4},
            "workload": {"input_len": 8, "output_len": 8}, "json_path": "j"}
    setup = {"weights": {}, "budget": {"kv_bytes_per_token": 1, "baseline": "mixtral"}}
    return {"mode": mode, "meta": meta, "points": points, "servers": [], "setup": setup}


def test_goals_ratios_are_paired_by_repeat_at_every_concurrency():
    data = _data()
    found = {(r["comparison"], r["concurrency"]): r for r in ratios(data)}
    for c in (1, 16):
        tput = found[("unipool-serve (global pool) / vllm serve Mixtral, output tok/s", c)]
        assert tput["ratios"] == [100.0 / 80.0, 90.0 / 100.0] and (tput["target"], tput["direction"]) == (1.0, ">=")
        itl = found[("unipool-serve (global pool) / vllm serve Mixtral, p99 ITL", c)]
        assert itl["ratios"] == [1.0, 1.1] and (itl["target"], itl["direction"]) == (1.05, "<=")
    budget = found[("reduced pool / vLLM Mixtral, same memory budget", 16)]
    assert budget["ratios"] == [1.5, 1.5] and budget["target"] == 1.3


def test_goals_section_has_its_own_markers_and_both_sweeps(tmp_path):
    data = _data()
    data["ratios"] = ratios(data)
    section = markdown(data, "img/")
    begin, end = markers("serving-goals")
    assert section.startswith(begin) and section.rstrip().endswith(end)
    assert "### `unipool-serve` sweep" in section and "### `vllm-mixtral` sweep" in section
    assert "| <= 1.05 |" in section and "| >= 1.0 |" in section
    doc = tmp_path / "benchmarks.md"
    other = "\n".join(markers()) + "\n"
    doc.write_text("# Benchmarks\n\n" + other)
    update_doc(doc, section, "serving-goals")
    update_doc(doc, section, "serving-goals")  # rewriting replaces its section, never the other one
    text = doc.read_text()
    assert text.count(begin) == 1 and other in text
