"""Tokens/s of the UniPool vLLM plugin vs vLLM's built-in MixtralForCausalLM, same shapes.

Both models: L layers, hidden H, expert width F, top-k softmax routing renormalised
(Mixtral's rule), E experts per pool (ours) / per layer (Mixtral), same attention
shapes, same vocabulary, same engine settings. Variants, one engine at a time in this process:

  mixtral             vLLM's MixtralForCausalLM (FusedMoE layer, per-layer experts) holding the
                      vanilla layout's own weights (benchmarks/shapes.py): the same model on both
                      servers, so they route alike and a step reads the same experts
  unipool-vanilla     ours, one pool per layer (same parameter count as Mixtral)
  unipool-global      ours, one global pool of E experts shared by all L layers
  unipool-global-nosteer  the same with UNIPOOL_STEERING=0 (routers skip the tables)
  mixtral-hugepages   vLLM's Mixtral with THP_MEM_ALLOC_ENABLE=1: torch's CPU allocator asks for
                      transparent huge pages for its large tensors (weights, KV cache), where the
                      kernel's THP mode is `madvise` (not in the default set: a placement experiment)

Engines of one variant differ from start to start (by up to 40% on a 2-vCPU machine), so each
variant is started --engines N times, interleaved (A B C D A B C D ...: a slow drift of the
machine weighs on every variant alike). Each engine: one warm-up generate, then --repeats
batched generates (--batch requests of --prompt-len random tokens, --gen-len new tokens each,
greedy, ignore_eos) and one single-request decode of --gen-len tokens; wall time and the CPU time
(user+system) of the worker, the engine core and this driver (benchmarks/engine_layout.py).

Reported per variant: the median over engines of each engine's median batched output tokens/s,
with the spread across engines (min-max); the same for the single request; worker CPU seconds per
generated token; the ratio to Mixtral from the medians, and per interleaving round (engine i of
the variant / engine i of Mixtral). Shapes: --shape tiny|big (benchmarks/shapes.py; --layers etc.
override one field). The machine must be quiet (benchmarks/quiet.py; --force-noisy runs anyway,
recorded as noisy); the engine's processes are pinned (--no-pin leaves them where they start).

Usage:  .venv/bin/python benchmarks/bench_plugin_vs_mixtral.py --compile --shape tiny --engines 3 \\
            --out docs/results/plugin-vs-mixtral-tiny.json
        .venv/bin/python benchmarks/bench_plugin_vs_mixtral.py --smoke --force-noisy --out /tmp/p.json
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import shapes as shape_sets  # noqa: E402

VARIANTS = ("mixtral", "unipool-vanilla", "unipool-global", "unipool-global-nosteer")
EXTRA_VARIANTS = ("mixtral-hugepages",)
SHAPE_FIELDS = ("layers", "hidden", "width", "experts", "top_k", "dtype")


# ---- model writers (benchmarks/serving/models.py uses these three with its own args) ----------------
def shapes(args) -> dict:
    """UniPoolConfig fields from args.layers, .hidden, .width, .experts, .top_k (benchmarks/shapes.py)."""
    return shape_sets.config_fields(args.layers, args.hidden, args.width, args.experts, args.top_k)


def write_unipool(path: Path, args, layers_per_pool: int) -> Path:
    return shape_sets.write_unipool(path, shapes(args), layers_per_pool, getattr(args, "write_dtype", "float32"))


def write_mixtral(path: Path, vanilla: Path) -> Path:
    """vLLM's Mixtral holding the vanilla folder's weights: the same model on both servers."""
    return shape_sets.write_mixtral(path, vanilla)


# ---- one engine ---------------------------------------------------------------------------------
def run_variant(name: str, model: Path, args, env: dict, engine_index: int) -> dict:
    import torch
    from vllm import LLM, SamplingParams

    from engine_layout import EngineLayout

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    t0 = time.perf_counter()
    try:
        llm = LLM(model=str(model), dtype=args.dtype, enforce_eager=not args.compile, max_model_len=512,
                  max_num_seqs=args.batch, max_num_batched_tokens=2048, enable_prefix_caching=False, seed=0)
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    start_s = time.perf_counter() - t0
    layout = EngineLayout.find(pin=not args.no_pin)

    gen = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(3, 300, (args.prompt_len,), generator=gen).tolist()}
               for _ in range(args.batch)]
    params = SamplingParams(temperature=0.0, max_tokens=args.gen_len, ignore_eos=True)

    def timed(batch):
        cpu = layout.cpu_times()
        t = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        wall = time.perf_counter() - t
        after = layout.cpu_times()
        assert all(len(o.outputs[0].token_ids) == args.gen_len for o in outs)
        return wall, {k: after[k] - cpu[k] for k in after}

    try:
        llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        batch = [timed(prompts) for _ in range(args.repeats)]
        single_s, single_cpu = timed(prompts[:1])  # decode-only view: one request, the same new tokens
        pin_check = layout.verify()
        huge_kib = {pid: _anon_huge_kib(pid) for pid in layout.workers}
    finally:
        layout.release()
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:
            pass
        left = layout.wait_gone()
        del llm
        gc.collect()
    out_tokens = args.batch * args.gen_len
    median = statistics.median(w for w, _ in batch)
    worker_cpu = statistics.median(c["worker"] for _, c in batch)
    return {"variant": name, "engine_index": engine_index, "engine_start_s": round(start_s, 1),
            "batch_times_s": [round(w, 4) for w, _ in batch], "batch_cpu_s": [c for _, c in batch],
            "batch_output_tok_s": out_tokens / median,
            "batch_total_tok_s": (out_tokens + args.batch * args.prompt_len) / median,
            "batch_worker_cpu_s_per_token": worker_cpu / out_tokens,
            "single_request_s": single_s, "single_request_cpu_s": single_cpu,
            "single_request_output_tok_s": args.gen_len / single_s,
            "single_request_worker_cpu_s_per_token": single_cpu["worker"] / args.gen_len,
            "layout": layout.as_dict(), "pin_check": pin_check, "processes_left_after_stop": left,
            "worker_anon_huge_pages_kib": huge_kib}


def _anon_huge_kib(pid: int) -> int | None:
    """KiB of the process's memory on transparent huge pages (/proc/PID/smaps_rollup), None if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


# ---- summary ------------------------------------------------------------------------------------
def over_engines(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "spread": (max(values) - min(values)) / statistics.median(values) if statistics.median(values) else None}


def summarise(engines: list[dict], variants: list[str]) -> list[dict]:
    keys = ("batch_output_tok_s", "batch_total_tok_s", "single_request_output_tok_s",
            "batch_worker_cpu_s_per_token", "single_request_worker_cpu_s_per_token")
    by = {v: [e for e in engines if e["variant"] == v] for v in variants}
    results = [{"variant": v, **{k: over_engines([e[k] for e in mine]) for k in keys}} for v, mine in by.items()]
    base = next((r for r in results if r["variant"] == "mixtral"), None)
    for r in results:
        if base is None:  # Mixtral not run: no ratios
            r.update(ratio_vs_mixtral=None, single_ratio_vs_mixtral=None, cpu_per_token_ratio_vs_mixtral=None,
                     ratio_vs_mixtral_per_round=[])
            continue
        r["ratio_vs_mixtral"] = r["batch_output_tok_s"]["median"] / base["batch_output_tok_s"]["median"]
        r["single_ratio_vs_mixtral"] = (r["single_request_output_tok_s"]["median"]
                                        / base["single_request_output_tok_s"]["median"])
        r["cpu_per_token_ratio_vs_mixtral"] = (base["batch_worker_cpu_s_per_token"]["median"]
                                               / r["batch_worker_cpu_s_per_token"]["median"])
        mix = {e["engine_index"]: e for e in by["mixtral"]}
        r["ratio_vs_mixtral_per_round"] = [e["batch_output_tok_s"] / mix[e["engine_index"]]["batch_output_tok_s"]
                                           for e in by[r["variant"]] if e["engine_index"] in mix]
    return results


def print_table(results: list[dict]) -> None:
    print(f"\n{'variant':<24}{'batch out tok/s (min-max)':>28}{'1-req tok/s (min-max)':>26}"
          f"{'CPU ms/tok':>11}{'vs mixtral':>11}{'per round':>22}")
    for r in results:
        b, s = r["batch_output_tok_s"], r["single_request_output_tok_s"]
        rounds = ",".join(f"{x:.2f}" for x in r.get("ratio_vs_mixtral_per_round", []))
        print(f"{r['variant']:<24}{b['median']:>10.1f} ({b['min']:.1f}-{b['max']:.1f}){'':>3}"
              f"{s['median']:>9.1f} ({s['min']:.1f}-{s['max']:.1f}){'':>3}"
              f"{1000 * r['batch_worker_cpu_s_per_token']['median']:>11.3f}"
              f"{r['ratio_vs_mixtral'] or float('nan'):>11.3f}{rounds:>22}")


def parse_args(argv=None):
    import quiet

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(shape_sets.SHAPE_SETS), default="tiny",
                    help="shape set (benchmarks/shapes.py); the flags below override one field")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--width", type=int, help="expert width F")
    ap.add_argument("--experts", type=int, help="experts per pool (ours) / per layer (Mixtral)")
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--dtype", help="served dtype")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=5, help="batched generates per engine (after one warm-up)")
    ap.add_argument("--engines", type=int, default=3, help="engines started per variant, interleaved")
    ap.add_argument("--compile", action="store_true", help="torch.compile (vLLM's default) instead of eager")
    ap.add_argument("--no-pin", action="store_true", help="leave the engine's processes where the kernel puts them")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--huge-pages", action="store_true",
                    help="every engine with THP_MEM_ALLOC_ENABLE=1 (transparent huge pages for torch's large tensors)")
    ap.add_argument("--smoke", action="store_true", help="smoke shapes, 1 engine, 1 repeat, a few tokens, eager")
    ap.add_argument("--out", default="docs/results/plugin-vs-mixtral.json")
    quiet.add_arguments(ap)
    args = ap.parse_args(argv)
    if args.smoke:
        args.shape, args.engines, args.repeats, args.batch, args.prompt_len, args.gen_len, args.compile = (
            "smoke", 1, 1, 2, 8, 4, False)
    shape = shape_sets.SHAPE_SETS[args.shape]
    for field in SHAPE_FIELDS:
        if getattr(args, field) is None:
            setattr(args, field, getattr(shape, field))
    args.write_dtype = shape.write_dtype
    unknown = set(args.variants.split(",")) - set(VARIANTS) - set(EXTRA_VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}")
    return args


def _thp_mode() -> str:
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        return "unknown"


def main(argv=None) -> None:
    import quiet

    args = parse_args(argv)
    before = quiet.check(args.force_noisy, wait_s=args.wait_quiet)
    variants = args.variants.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench_plugin_"))
    written: dict[str, Path] = {}

    def folder(kind: str) -> Path:  # written once, when a variant first needs it
        if kind not in written:
            if kind == "vanilla" or kind == "mixtral":
                written.setdefault("vanilla", write_unipool(work / "unipool_vanilla", args, layers_per_pool=1))
            if kind == "mixtral":
                written["mixtral"] = write_mixtral(work / "mixtral", written["vanilla"])
            if kind == "global":
                written["global"] = write_unipool(work / "unipool_global", args, args.layers)
        return written[kind]

    models = {"mixtral": ("mixtral", {}), "unipool-vanilla": ("vanilla", {}), "unipool-global": ("global", {}),
              "unipool-global-nosteer": ("global", {"UNIPOOL_STEERING": "0"}),
              "mixtral-hugepages": ("mixtral", {"THP_MEM_ALLOC_ENABLE": "1"})}
    engines = []
    try:
        for index in range(args.engines):
            for name in variants:
                kind, env = models[name]
                env = {**env, "THP_MEM_ALLOC_ENABLE": "1"} if args.huge_pages else env
                engines.append(run_variant(name, folder(kind), args, env, index))
                e = engines[-1]
                print(json.dumps({k: e[k] for k in ("variant", "engine_index", "engine_start_s", "batch_times_s",
                                                   "batch_output_tok_s", "single_request_output_tok_s",
                                                   "batch_worker_cpu_s_per_token")}), flush=True)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    results = summarise(engines, variants)
    print_table(results)
    shape = {**shape_sets.SHAPE_SETS[args.shape].describe(), **{f: getattr(args, f) for f in SHAPE_FIELDS}}
    data = {"benchmark": "bench_plugin_vs_mixtral", "args": vars(args), "shape": shape, **quiet.record(before),
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "transparent_hugepage": _thp_mode()},
            "statistic": "per engine: median over repeats of the batched wall time -> output tokens/s; per variant: "
                         "median over engines, spread = (max - min) / median over engines; ratio_vs_mixtral from the "
                         "medians; ratio_vs_mixtral_per_round: engine i / Mixtral's engine i; CPU s per token: the "
                         "worker's user+system CPU time over the generated tokens",
            "engines": engines, "results": results}
    quiet.write_json(args.out, data)


if __name__ == "__main__":
    main()
