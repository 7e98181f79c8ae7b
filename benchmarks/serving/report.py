"""Ratios, markdown tables and plots from one harness run's JSON."""

from __future__ import annotations

import statistics
from pathlib import Path

BEGIN, END = "<!-- serving-harness:begin -->", "<!-- serving-harness:end -->"

# name: (A server, A kind, B server, B kind, concurrency key, target, what it says)
RATIOS = [
    ("plugin overhead (vanilla layout on our plugin / vLLM Mixtral)", ("vllm-vanilla", "vllm-mixtral"), "compare_at", 1.0),
    ("UniPool model on our plugin / vLLM Mixtral", ("vllm-unipool", "vllm-mixtral"), "compare_at", None),
    ("reduced pool / vanilla layout, same engine settings", ("vllm-unipool", "vllm-vanilla"), "compare_at", None),
    ("reduced pool / vanilla layout, same memory budget", ("budget-unipool", "budget-vanilla"), "budget_at", None),
    ("front end (unipool-serve / vLLM's OpenAI server)", ("unipool-serve", "vllm-unipool"), "compare_at", 0.98),
    ("steering on (half the requests, 3 profiles) / off", ("unipool-serve:steering-on", "unipool-serve:steering-off"), "compare_at", 0.97),
    ("routing statistics on / off", ("unipool-serve", "unipool-serve-stats-off"), "compare_at", 0.98),
]


def _tput(points, server, concurrency, repeat):
    name, _, kind = server.partition(":")
    for p in points:
        if p["server"] == name and p["concurrency"] == concurrency and p["repeat"] == repeat and \
                (p["kind"] == kind if kind else not p["kind"].startswith("steering")):
            return p["output_throughput"]
    return None


def ratios(data: dict) -> list[dict]:
    mode, points = data["mode"], data["points"]
    out = []
    for label, (a, b), ckey, target in RATIOS:
        c = mode[ckey]
        per_repeat = []
        for r in range(mode["repeats"]):
            ta, tb = _tput(points, a, c, r), _tput(points, b, c, r)
            if ta and tb:
                per_repeat.append(ta / tb)
        if per_repeat:
            out.append({"comparison": label, "a": a, "b": b, "concurrency": c, "ratios": per_repeat,
                        "median": statistics.median(per_repeat), "target": target})
    ref = data.get("reference", {}).get("generate", [])
    for g in ref:
        b = g["batch"]
        per_repeat = [_tput(points, "unipool-serve", b, r) for r in range(mode["repeats"])]
        hf = statistics.median(g["output_throughput"])
        vals = [x / hf for x in per_repeat if x]
        if vals:
            out.append({"comparison": f"unipool-serve at concurrency {b} / reference model HF generate batch {b}",
                        "a": "unipool-serve", "b": f"HF generate b{b}", "concurrency": b, "ratios": vals,
                        "median": statistics.median(vals), "target": None})
    return out


def _spread(vals, fmt="{:.3f}"):
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(statistics.median(vals))} ({fmt.format(min(vals))}-{fmt.format(max(vals))}, n={len(vals)})"


def _mib(x):
    return f"{x / 2**20:.0f}"


def markdown(data: dict, img_prefix: str) -> str:
    mode, meta, points = data["mode"], data["meta"], data["points"]
    lines = [BEGIN, f"## Serving on vLLM CPU: `benchmarks/run_serving.py` ({mode['name']} mode)", "",
             f"Command: `{meta['command']}`. Date: {meta['date']}. Machine: {meta['machine_text']}.", ""]
    lines += [f"- {c}" for c in meta["caveats"]]
    lines += ["", "Settings (identical for every server unless stated): " + meta["settings_text"], "",
              "### Headline ratios (output tokens/s, A / B)", "",
              "| comparison | concurrency | ratio (median (min-max, n)) | target |", "|---|---|---|---|"]
    for r in data["ratios"]:
        target = f">= {r['target']}" if r["target"] else "-"
        lines.append(f"| {r['comparison']} | {r['concurrency']} | {_spread(r['ratios'])} | {target} |")
    lines += ["", "### `unipool-serve` sweep (UniPool model, vLLM's serving benchmark client)", "",
              "| concurrency | prompts | output tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | peak RSS (MiB) | u_l per step (uniform) |",
              "|---|---|---|---|---|---|---|"]
    ul = {u["batch"]: u for u in data.get("reference", {}).get("u_l", {}).get("unipool", [])}
    for c in mode["concurrencies"]:
        ps = [p for p in points if p["server"] == "unipool-serve" and p["kind"] == "sweep" and p["concurrency"] == c]
        if not ps:
            continue
        f = lambda k: [p[k] for p in ps]
        u = ul.get(c)
        ucell = f"{u['u_mean']:.1f} ({u['u_uniform']:.1f})" if u else "-"
        lines.append(f"| {c} | {ps[0]['num_prompts']} | {_spread(f('output_throughput'), '{:.1f}')} | "
                     f"{_spread(f('median_ttft_ms'), '{:.0f}')} / {_spread(f('p99_ttft_ms'), '{:.0f}')} | "
                     f"{_spread(f('median_itl_ms'), '{:.1f}')} / {_spread(f('p99_itl_ms'), '{:.1f}')} | "
                     f"{_spread([p['rss_peak_bytes'] / 2**20 for p in ps], '{:.0f}')} | {ucell} |")
    lines += ["", "### Every measured point", "",
              "| server | model | client | kind | concurrency | repeat | output tok/s | TTFT p50 (ms) | ITL p50 / p99 (ms) | peak RSS (MiB) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p['server']} | {p['model']} | {p['client']} | {p['kind']} | {p['concurrency']} | {p['repeat']} | "
                     f"{p['output_throughput']:.1f} | {p['median_ttft_ms']:.0f} | {p['median_itl_ms']:.1f} / "
                     f"{p['p99_itl_ms']:.1f} | {_mib(p['rss_peak_bytes'])} |")
    lines += ["", "### Servers", "", "| server | repeat | start (s) | RSS ready / peak (MiB) | KV cache (tokens) | other vLLM processes | load avg before |",
              "|---|---|---|---|---|---|---|"]
    for s in data["servers"]:
        lines.append(f"| {s['server']} | {s['repeat']} | {s['start_seconds']:.0f} | {_mib(s['rss_ready_bytes'])} / "
                     f"{_mib(s['rss_peak_bytes'])} | {s.get('kv_tokens', '?')} | {s['other_vllm_processes']} | "
                     f"{s['load_average_before'][0]:.1f} |")
    w, budget = data["setup"]["weights"], data["setup"]["budget"]
    lines += ["", "### Weights and the memory budget", "", "| model | weight bytes (MiB) | of which experts | experts stored |",
              "|---|---|---|---|"]
    shape = data["meta"]["shape"]
    stored = {"unipool": f"{shape['layers'] * shape['experts_per_layer'] // 2} (one pool)",
              "vanilla": f"{shape['layers'] * shape['experts_per_layer']} ({shape['experts_per_layer']} per layer)",
              "mixtral": f"{shape['layers'] * shape['experts_per_layer']} ({shape['experts_per_layer']} per layer)"}
    for k, v in w.items():
        lines.append(f"| {k} | {_mib(v['total'])} | {_mib(v['experts'])} | {stored[k]} |")
    if "kv" in budget:
        lines += ["", f"Memory budget = vanilla weights + KV room for {mode['budget_kv_seqs']} sequences of "
                  f"{data['meta']['workload']['input_len']}+{data['meta']['workload']['output_len']} tokens "
                  f"(rounded up to 128) = {_mib(budget['total_bytes'])} MiB; the reduced pool spends the weight "
                  f"bytes it saves on KV cache. KV bytes per token: {budget['kv_bytes_per_token']}.", "",
                  "| layout | KV bytes (MiB) | KV tokens (vLLM) | max concurrency at 512 tokens (vLLM) | "
                  f"output tok/s at concurrency {mode['budget_at']} |", "|---|---|---|---|---|"]
        for k in ("vanilla", "unipool"):
            srv = [s for s in data["servers"] if s["server"] == f"budget-{k}"]
            tp = [p["output_throughput"] for p in points if p["server"] == f"budget-{k}"]
            if srv:
                lines.append(f"| {k} | {budget['kv'][k] / 2**20:.1f} | {srv[0].get('kv_tokens', '?')} | "
                             f"{srv[0].get('kv_max_concurrency', '?')} | {_spread(tp, '{:.1f}') if tp else '-'} |")
    ref = data.get("reference", {})
    if ref.get("u_l"):
        lines += ["", "### Distinct experts per layer per decode step (u_l), reference model, offline", "",
                  "| model | experts per pool | batch | u_l mean (min-max) | uniform routing | per layer | experts read per step (all layers) |",
                  "|---|---|---|---|---|---|---|"]
        for model, rows in ref["u_l"].items():
            for u in rows:
                per = ", ".join(f"{x:.1f}" for x in u["u_mean_per_layer"])
                lines.append(f"| {model} | {u['pool_size']} | {u['batch']} | {u['u_mean']:.2f} ({u['u_min']:.0f}-{u['u_max']:.0f}) | "
                             f"{u['u_uniform']:.2f} | {per} | {u['experts_read_per_step']:.1f} |")
    if ref.get("generate"):
        lines += ["", "### Reference model (pure PyTorch, HF `generate`, greedy, same dtype)", "",
                  "| batch | output tok/s |", "|---|---|"]
        for g in ref["generate"]:
            lines.append(f"| {g['batch']} | {_spread(g['output_throughput'], '{:.1f}')} |")
    lines += ["", "Plots:", ""]
    lines += [f"![{name}]({img_prefix}{name}.png)" for name in data.get("plots", [])]
    lines += ["", f"Raw data: `{data['meta']['json_path']}`.", END]
    return "\n".join(lines) + "\n"


def update_doc(doc: Path, section: str) -> None:
    """Replace our marked section in docs/benchmarks.md (append it if absent); other sections stay."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    doc.write_text(text)


def plots(data: dict, out_dir: Path, prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    names, points, mode = [], data["points"], data["mode"]
    sweep = [p for p in points if p["server"] == "unipool-serve" and p["kind"] == "sweep"]
    if sweep:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for ax, key, label in zip(axes, ("output_throughput", "median_ttft_ms", "median_itl_ms"),
                                  ("output tokens/s", "TTFT p50 (ms)", "inter-token latency (ms)")):
            cs = sorted({p["concurrency"] for p in sweep})
            for p in sweep:
                ax.scatter(p["concurrency"], p[key], color="tab:blue", alpha=0.5, s=14)
            ax.plot(cs, [statistics.median(p[key] for p in sweep if p["concurrency"] == c) for c in cs], "o-",
                    label="p50")
            if key == "median_itl_ms":
                ax.plot(cs, [statistics.median(p["p99_itl_ms"] for p in sweep if p["concurrency"] == c) for c in cs],
                        "s--", label="p99")
                ax.legend()
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        fig.suptitle("unipool-serve, UniPool model, vLLM CPU (points: repeats, line: median)")
        fig.tight_layout()
        names.append(f"{prefix}sweep")
        fig.savefig(out_dir / f"{names[-1]}.png", dpi=100)
        plt.close(fig)
    rs = data["ratios"]
    if rs:
        fig, ax = plt.subplots(figsize=(9, 0.45 * len(rs) + 1.2))
        for i, r in enumerate(rs):
            ax.scatter(r["ratios"], [i] * len(r["ratios"]), color="tab:blue", s=14, alpha=0.6)
            ax.plot([r["median"]], [i], "D", color="tab:blue")
            if r["target"]:
                ax.plot([r["target"]], [i], "|", color="tab:red", markersize=14)
        ax.axvline(1.0, color="gray", lw=0.8)
        ax.set_yticks(range(len(rs)), [r["comparison"][:60] for r in rs], fontsize=8)
        ax.set_xlabel("throughput ratio A / B (diamond: median; red bar: target)")
        fig.tight_layout()
        names.append(f"{prefix}ratios")
        fig.savefig(out_dir / f"{names[-1]}.png", dpi=100)
        plt.close(fig)
    ul = data.get("reference", {}).get("u_l", {})
    if ul:
        fig, ax = plt.subplots(figsize=(6, 4))
        for model, rows in ul.items():
            bs = [u["batch"] for u in rows]
            ax.plot(bs, [u["u_mean"] for u in rows], "o-", label=f"{model} measured (pool {rows[0]['pool_size']})")
            ax.plot(bs, [u["u_uniform"] for u in rows], "--", label=f"{model} uniform routing")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequences decoding together")
        ax.set_ylabel("distinct experts per layer per step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        names.append(f"{prefix}experts-per-step")
        fig.savefig(out_dir / f"{names[-1]}.png", dpi=100)
        plt.close(fig)
    return names
