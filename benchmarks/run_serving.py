"""Serving benchmarks on vLLM CPU: one command, servers started one at a time, ratios as the headline.

    python benchmarks/run_serving.py            # full: concurrency 1, 8, 32, 128; 3 repeats (about an hour)
    python benchmarks/run_serving.py --quick    # concurrency 1 and 8, one repeat (about 10-15 minutes)
    python benchmarks/run_serving.py --smoke --out-dir /tmp/s   # tiny model, one point, one comparison
    python benchmarks/run_serving.py --goals    # the big shape, compiled: unipool-serve vs vllm serve
                                                # Mixtral at concurrency 1, 16, 64, steering, equal memory

Writes docs/results/serving-<mode>.json, docs/img/serving-<mode>-*.png and its own
section of docs/benchmarks.md (between serving-harness markers, serving-goals for --goals;
other sections stay). --smoke (and --out-dir) write under the given folder and leave docs/ alone.
Every mode but --smoke measures, so it first asks benchmarks/quiet.py whether the machine is
quiet (waiting up to --wait-quiet seconds) and refuses otherwise unless --force-noisy.
See docs/benchmarks.md for what each comparison means.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quiet  # noqa: E402
from serving.harness import Harness, dump, log, machine_info  # noqa: E402
from serving.load import random_prompts  # noqa: E402
from serving.models import DTYPES  # noqa: E402
from serving.plan import COMPARISONS, KV_SPACE_GIB, MODES  # noqa: E402
from serving.report import markdown, plots, ratios, update_doc  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_mutually_exclusive_group()
    m.add_argument("--quick", action="store_true", help="concurrency 1 and 8, one repeat")
    m.add_argument("--smoke", action="store_true", help="tiny model, concurrency 1, steering comparison only")
    m.add_argument("--goals", action="store_true",
                   help="big shape, compiled, huge pages: unipool-serve vs vllm serve Mixtral at 1, 16, 64")
    p.add_argument("--repeats", type=int, help="override the mode's repeats")
    p.add_argument("--comparisons", help=f"comma-separated subset of {','.join(COMPARISONS)}")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="model and engine dtype (default bfloat16)")
    p.add_argument("--work-dir", type=Path, help="models, logs, raw client results (default: a new temp folder)")
    p.add_argument("--out-dir", type=Path, help="write JSON, plots and the markdown section here instead of docs/")
    p.add_argument("--from-json", type=Path,
                   help="re-render plots and the markdown section from a results JSON (no measurement)")
    p.add_argument("--wait-quiet", type=float, default=120,
                   help="seconds to wait for a quiet machine before starting, and at each server start while "
                        "other vLLM engines run (default 120)")
    p.add_argument("--force-noisy", action="store_true",
                   help="measure on a busy machine anyway (warns; the JSON says noisy: true)")
    return p.parse_args(argv)


def machine_text(info: dict) -> str:
    isa = "AVX-512" if info["avx512"] else "AVX2, no AVX-512"
    return f"{info['vcpus']} vCPU {info['cpu']} ({isa}, {'AMX' if info['amx'] else 'no AMX'}), {info['memory_gib']} GiB"


def reference(h: Harness, mode) -> dict:
    from serving import reference as ref

    out: dict = {"u_l": {}, "generate": []}
    vocab = min(mode.shape.vocab, 320)
    batches = sorted({*mode.concurrencies, mode.compare_at, mode.budget_at})
    prompts = random_prompts(vocab, max(batches), mode.workload.input_len, mode.workload.seed)
    for key in [k for k in ("unipool", "vanilla") if k in h.models]:
        model = ref.load(h.models[key], DTYPES[mode.shape.dtype])
        out["u_l"][key] = [ref.distinct_experts_per_step(model, prompts, b, mode.workload.output_len) for b in batches]
        log(f"  u_l {key}: " + ", ".join(f"B={u['batch']}: {u['u_mean']:.1f}" for u in out["u_l"][key]))
        if key == "unipool" and "reference" in mode.comparisons:
            for b in (1, 8):
                out["generate"].append(ref.generate_throughput(model, prompts, b, mode.workload.output_len, mode.repeats))
                log(f"  HF generate batch {b}: {out['generate'][-1]['output_throughput']}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        out_dir = args.out_dir
        json_path = (out_dir or REPO / "docs" / "results") / f"serving-{data['mode']['name']}.json"
        render(data, json_path, out_dir or REPO / "docs" / "img",
               (out_dir / "benchmarks.md") if out_dir else REPO / "docs" / "benchmarks.md", out_dir)
        return 0
    mode = MODES["quick" if args.quick else "smoke" if args.smoke else "goals" if args.goals else "full"]
    if args.repeats:
        mode = replace(mode, repeats=args.repeats)
    if args.comparisons:
        unknown = set(args.comparisons.split(",")) - set(COMPARISONS)
        if unknown:
            sys.exit(f"unknown comparisons {sorted(unknown)}; choose from {COMPARISONS}")
        mode = replace(mode, comparisons=tuple(args.comparisons.split(",")))
    if args.dtype:
        mode = mode.with_dtype(args.dtype)
    out_dir = args.out_dir or (None if not args.smoke else Path(tempfile.mkdtemp(prefix="serving-smoke-")))
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="serving-bench-"))
    json_path = (out_dir or REPO / "docs" / "results") / f"serving-{mode.name}.json"
    img_dir = out_dir or REPO / "docs" / "img"
    doc = (out_dir / "benchmarks.md") if out_dir else REPO / "docs" / "benchmarks.md"

    # the smoke run checks that the harness works (the test suite runs it), it measures nothing
    before = None if args.smoke else quiet.check(args.force_noisy, wait_s=args.wait_quiet)
    t0 = time.time()
    h = Harness(mode, work, wait_quiet=args.wait_quiet)
    setup = h.prepare()
    h.run(h.phases())
    quiet_after = None if args.smoke else quiet.after(before)
    ref = {"u_l": {}, "generate": []}
    if mode.offline_reference:
        log("reference model (offline): u_l and HF generate")
        ref = reference(h, mode)
    info = machine_info()
    loads = [x for s in h.servers for x in (s["load_average_before"][0], s["load_average_after"][0])]
    loads += [p["load_average_after"] for p in h.points]
    others = max([s["other_vllm_processes"] for s in h.servers]
                 + [p["other_vllm_processes_after"] for p in h.points], default=0)
    caveats = []
    if others or max(loads, default=0) > 1.5 * (info["vcpus"] or 1):
        caveats.append(f"Other jobs shared this machine during the run: 1-minute load average {min(loads):.1f}-"
                       f"{max(loads):.1f} on {info['vcpus']} vCPUs (sampled at server starts/stops and after each point), "
                       f"up to {others} other vLLM process(es) alive at a server start or at the end of a point. "
                       "Treat differences of a few percent as noise.")
    if before:
        caveats.append(f"Machine {'NOT quiet (forced)' if before['noisy'] else 'quiet'} at the start: 1-minute load "
                       f"{before['load_before']}, busy processes {len(before['busy_processes'])}; at the end "
                       f"{quiet_after['load_after']} (benchmarks/quiet.py).")
    if mode.offline_reference:
        caveats.append("u_l is not read from the server (it exports cumulative per-expert counts, not per-step sets): "
                       "it is measured offline with the reference model on random prompts of the same length, B "
                       "sequences decoding together (B = the concurrency), greedy.")
    caveats += [
        "Peak RSS is the sum over the server's process tree (API process, engine core, worker), sampled every "
        "0.2 s; pages shared between processes count once per process.",
        "The steering comparison uses the harness's own streaming client (vLLM's client cannot vary a top-level "
        "field per request); both of its sides use that client and the same prompts.",
    ]
    engine = " ".join(mode.engine_args)
    env = "".join(f", `{k}={v}`" for k, v in mode.env)
    compiled = ("torch.compile for every server (vLLM's default compilation; CUDA graphs do not exist on CPU)"
                if mode.compiled else
                "eager mode for every server (no torch.compile: it would add ~40-50 s to each of the many starts)")
    data = {
        "mode": {**asdict(mode), "name": mode.name},
        "meta": {
            "command": "python benchmarks/run_serving.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
            "date": time.strftime("%Y-%m-%d"), "machine": info, "machine_text": machine_text(info),
            "caveats": caveats, "shape": asdict(mode.shape), "workload": asdict(mode.workload),
            "settings_text": (f"`{engine}`, `VLLM_CPU_KVCACHE_SPACE={KV_SPACE_GIB}` (GiB){env}; {compiled}; random "
                              f"prompts of {mode.workload.input_len} tokens, {mode.workload.output_len} output tokens "
                              f"(ignore_eos), greedy, seed {mode.workload.seed}; prompts per point = "
                              f"{mode.waves} x concurrency (at least 8); model shapes {asdict(mode.shape)}."),
            "json_path": str(json_path.relative_to(REPO) if json_path.is_relative_to(REPO) else json_path),
            "wall_seconds": None,
        },
        "setup": setup, "servers": h.servers, "points": h.points, "reference": ref,
        "noisy": bool(before and before["noisy"]), "quiet_before": before, "quiet_after": quiet_after,
    }
    data["meta"]["wall_seconds"] = round(time.time() - t0)
    render(data, json_path, img_dir, doc, out_dir)
    return 0


def render(data: dict, json_path: Path, img_dir: Path, doc: Path, out_dir: Path | None) -> None:
    data["meta"]["json_path"] = str(json_path.relative_to(REPO) if json_path.is_relative_to(REPO) else json_path)
    data["ratios"] = ratios(data)
    data["plots"] = plots(data, img_dir, f"serving-{data['mode']['name']}-")
    dump(json_path, data)
    update_doc(doc, markdown(data, "img/" if not out_dir else ""), data["mode"].get("doc_section", "serving-harness"))
    log(f"wrote {json_path}, {doc}, plots in {img_dir}")
    for r in data["ratios"]:
        print(f"  {r['comparison']}: {r['median']:.3f} {['%.3f' % x for x in r['ratios']]}")


if __name__ == "__main__":
    sys.exit(main())
