"""Ratios, markdown tables and plots from one harness run's JSON."""

from __future__ import annotations

import statistics
from pathlib import Path



def markers(section: str = "serving-harness") -> tuple[str, str]:
    """The begin and end comments around a mode's own section of docs/benchmarks.md."""
    return f"<!-- {section}:begin -->", f"<!-- {section}:end -->"


# name: (A server, A kind, B server, B kind, concurrency key, target, what it says)
RATIOS = [
    ("plugin overhead (vanilla layout on our plugin / vLLM Mixtral)", ("vllm-vanilla", "vllm-mixtral"), "compare_at", 1.0),
    ("UniPool model on our plugin / vLLM Mixtral", ("vllm-unipool", "vllm-mixtral"), "compare_at", None),
    ("reduced pool / vanilla layout, same engine settings", ("vllm-unipool", "vllm-vanilla"), "compare_at", None),
    ("reduced pool / vanilla layout, same memory budget", ("budget-unipool", "budget-vanilla"), "budget_at", None),
    ("reduced pool / vLLM Mixtral, same memory budget", ("budget-unipool", "budget-mixtral"), "budget_at", 1.3),
    ("front end (unipool-serve / vLLM's OpenAI server)", ("unipool-serve", "vllm-unipool"), "compare_at", 0.98),
    ("steering on (half the requests, 3 profiles) / off", ("unipool-serve:steering-on", "unipool-serve:steering-off"), "compare_at", 0.97),
    ("routing statistics on / off", ("unipool-serve", "unipool-serve-stats-off"), "compare_at", 0.98),
]


def _tput(points, server, concurrency, repeat, key="output_throughput"):
    name, _, kind = server.partition(":")
    for p in points:
        if p["server"] == name and p["concurrency"] == concurrency and p["repeat"] == repeat and \
                (p["kind"] == kind if kind else not p["kind"].startswith("steering")):
            return p[key]
    return None


def _http_ratios(mode: dict, points: list[dict]) -> list[dict]:
    """unipool-serve / vLLM's Mixtral at every swept concurrency: output tok/s (>= 1) and p99 ITL (<= 1.05)."""
    out = []
    if not any(p["server"] == "vllm-mixtral" and p["kind"] == "sweep" for p in points):
        return out
    for c in mode["concurrencies"]:
        for label, key, target, direction in (("output tok/s", "output_throughput", 1.0, ">="),
                                              ("p99 ITL", "p99_itl_ms", 1.05, "<=")):
            per_repeat = []
            for r in range(mode["repeats"]):
                a = _tput(points, "unipool-serve", c, r, key)
                b = _tput(points, "vllm-mixtral", c, r, key)
                if a and b:
                    per_repeat.append(a / b)
            if per_repeat:
                out.append({"comparison": f"unipool-serve (global pool) / vllm serve Mixtral, {label}",
                            "a": "unipool-serve", "b": "vllm-mixtral", "concurrency": c, "ratios": per_repeat,
                            "median": statistics.median(per_repeat), "target": target, "direction": direction})
    return out


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
    out += _http_ratios(mode, points)
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
    begin, end = markers(mode.get("doc_section", "serving-harness"))
    lines = [begin, f"## Serving on vLLM CPU: `benchmarks/run_serving.py` ({mode['name']} mode)", "",
             f"Command: `{meta['command']}`. Date: {meta['date']}. Machine: {meta['machine_text']}.", ""]
    lines += [f"- {c}" for c in meta["caveats"]]
    lines += ["", "Settings (identical for every server unless stated): " + meta["settings_text"], "",
              "### Headline ratios (output tokens/s, A / B)", "",
              "| comparison | concurrency | ratio (median (min-max, n)) | target |", "|---|---|---|---|"]
    for r in data["ratios"]:
        target = f"{r.get('direction', '>=')} {r['target']}" if r["target"] else "-"
        lines.append(f"| {r['comparison']} | {r['concurrency']} | {_spread(r['ratios'])} | {target} |")
    ul = {u["batch"]: u for u in data.get("reference", {}).get("u_l", {}).get("unipool", [])}
    for server, what in (("unipool-serve", "UniPool model"), ("vllm-mixtral", "vLLM's Mixtral")):
        swept = [p for p in points if p["server"] == server and p["kind"] == "sweep"]
        if not swept:
            continue
        lines += ["", f"### `{server}` sweep ({what}, vLLM's serving benchmark client)", "",
                  "| concurrency | prompts | output tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | peak RSS (MiB) | u_l per step (uniform) |",
                  "|---|---|---|---|---|---|---|"]
        for c in mode["concurrencies"]:
            ps = [p for p in swept if p["concurrency"] == c]
            if not ps:
                continue
            f = lambda k: [p[k] for p in ps]
            u = ul.get(c) if server == "unipool-serve" else None
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
    stored = {"unipool": f"{shape.get('pool_experts') or shape['layers'] * shape['experts_per_layer'] // 2} (one pool)",
              "vanilla": f"{shape['layers'] * shape['experts_per_layer']} ({shape['experts_per_layer']} per layer)",
              "mixtral": f"{shape['layers'] * shape['experts_per_layer']} ({shape['experts_per_layer']} per layer)"}
    for k, v in w.items():
        lines.append(f"| {k} | {_mib(v['total'])} | {_mib(v['experts'])} | {stored[k]} |")
    if "kv" in budget:
        base = budget.get("baseline", "vanilla")
        lines += ["", f"Memory budget = {base} weights + KV room for {mode['budget_kv_seqs']} sequences of "
                  f"{data['meta']['workload']['input_len']}+{data['meta']['workload']['output_len']} tokens "
                  f"(rounded up to 128) = {_mib(budget['total_bytes'])} MiB; the reduced pool spends the weight "
                  f"bytes it saves on KV cache. KV bytes per token: {budget['kv_bytes_per_token']}.", "",
                  "| layout | KV bytes (MiB) | KV tokens (vLLM) | max concurrency at 512 tokens (vLLM) | "
                  f"output tok/s at concurrency {mode['budget_at']} |", "|---|---|---|---|---|"]
        for k in (base, "unipool"):
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
    lines += ["", f"Raw data: `{data['meta']['json_path']}`.", end]
    return "\n".join(lines) + "\n"


def update_doc(doc: Path, section: str, doc_section: str = "serving-harness") -> None:
    """Replace the mode's marked section in docs/benchmarks.md (append it if absent); other sections stay."""
    begin, end = markers(doc_section)
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
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
    sweeps = {server: [p for p in points if p["server"] == server and p["kind"] == "sweep"]
              for server in ("unipool-serve", "vllm-mixtral")}
    sweeps = {server: sweep for server, sweep in sweeps.items() if sweep}
    if sweeps:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for ax, key, label in zip(axes, ("output_throughput", "median_ttft_ms", "median_itl_ms"),
                                  ("output tokens/s", "TTFT p50 (ms)", "inter-token latency (ms)")):
            for (server, sweep), color in zip(sweeps.items(), ("tab:blue", "tab:orange")):
                cs = sorted({p["concurrency"] for p in sweep})
                for p in sweep:
                    ax.scatter(p["concurrency"], p[key], color=color, alpha=0.5, s=14)
                ax.plot(cs, [statistics.median(p[key] for p in sweep if p["concurrency"] == c) for c in cs], "o-",
                        color=color, label=f"{server} p50")
                if key == "median_itl_ms":
                    ax.plot(cs, [statistics.median(p["p99_itl_ms"] for p in sweep if p["concurrency"] == c)
                                 for c in cs], "s--", color=color, label=f"{server} p99")
            if key == "median_itl_ms" or len(sweeps) > 1:
                ax.legend(fontsize=7)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        fig.suptitle(f"{' vs '.join(sweeps)}, vLLM CPU (points: repeats, line: median)")
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
