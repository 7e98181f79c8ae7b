"""Which ops a COMPILED decode step runs, per variant: the torch profiler's CPU ops by self time.

profile_decode_step.py splits an eager step into parts; a compiled step cannot be split that
way (Inductor fuses our ops into its own kernels), but the profiler still sees every op the
graph calls outside Inductor's kernels (vLLM's and our custom ops, aten fallbacks such as a
sort) and the time spent inside them ("## Call CompiledFxGraph ##"'s self time). Comparing
the op lists of two variants shows what one step runs that the other does not: that is how
the routing's sort, the counts' index_put and the custom op wrapper around cpu_fused_moe were
found (docs/benchmarks.md, "The compiled step's gap").

Each variant runs in its own process (this script re-invokes itself), compiled (vLLM's
default), engine core and worker in that process (VLLM_ENABLE_V1_MULTIPROCESSING=0), huge pages
on (THP_MEM_ALLOC_ENABLE=1): two warm-up generates of one request (64 prompt tokens, --tokens
new tokens), one timed without the profiler, one under it. Reported per op: calls and self /
total CPU microseconds per generated token. The timed figure is one generate in one engine:
compare op lists and calls, not the times, across variants (bench_plugin_vs_mixtral.py is
the timing).

Variants: mixtral (vLLM's own, holding the vanilla layout's weights), unipool-vanilla, unipool-global,
and on request mixtral-worker (vLLM's Mixtral with the steering worker, nobody steered: what the idle
worker adds to plain vLLM; that is how the capture copies of every step were found).

Usage:  .venv/bin/python benchmarks/profile_compiled_step.py --shape tiny --out docs/results/compiled-step-profile-tiny.json
Prints the top ops of each variant and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import shapes as shape_sets  # noqa: E402

VARIANTS = ("mixtral", "unipool-vanilla", "unipool-global")
# vLLM's Mixtral with the steering worker and nobody steered: what the idle worker adds to plain vLLM
EXTRA_VARIANTS = ("mixtral-worker",)
WORKER = "unipool_serve.model_executor.steering.worker.SteeringWorker"


def profile_one(model: str, dtype: str, tokens: int, worker: bool = False) -> dict:
    """Inside the variant's own process."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype=dtype, max_model_len=512, max_num_seqs=16, max_num_batched_tokens=2048,
              enable_prefix_caching=False, seed=0, **({"worker_cls": WORKER} if worker else {}))
    prompt = [{"prompt_token_ids": list(range(3, 67))}]
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    for _ in range(2):
        llm.generate(prompt, params, use_tqdm=False)
    start = time.perf_counter()
    llm.generate(prompt, params, use_tqdm=False)
    wall = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.generate(prompt, params, use_tqdm=False)
    ops = [{"op": e.key, "calls": e.count, "self_us_per_token": e.self_cpu_time_total / tokens,
            "total_us_per_token": e.cpu_time_total / tokens} for e in prof.key_averages()]
    ops.sort(key=lambda o: -o["self_us_per_token"])
    return {"ms_per_token_unprofiled": 1e3 * wall / tokens, "ops": ops}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=sorted(shape_sets.SHAPE_SETS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--top", type=int, default=30, help="ops printed per variant (the JSON keeps all)")
    ap.add_argument("--out", default="compiled-step-profile.json")
    ap.add_argument("--force-noisy", action="store_true")
    ap.add_argument("--wait-quiet", type=float, default=0)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # MODEL DTYPE WORKER, inside a variant's process
    args = ap.parse_args(argv)
    if args.child:
        model, dtype, worker = args.child
        print("RESULT " + json.dumps(profile_one(model, dtype, args.tokens, worker == "worker")), flush=True)
        return
    import quiet

    variants = args.variants.split(",")
    if set(variants) - set(VARIANTS + EXTRA_VARIANTS):
        ap.error(f"unknown variants {sorted(set(variants) - set(VARIANTS + EXTRA_VARIANTS))}")
    before = quiet.check(args.force_noisy, wait_s=args.wait_quiet)
    shape = shape_sets.SHAPE_SETS[args.shape]
    fields = shape_sets.config_fields(shape.layers, shape.hidden, shape.width, shape.experts, shape.top_k)
    results = {}
    with tempfile.TemporaryDirectory(prefix="profile_compiled_") as tmp:
        vanilla = shape_sets.write_unipool(Path(tmp) / "vanilla", fields, 1, shape.write_dtype)
        folders = {"unipool-vanilla": vanilla,
                   "mixtral": shape_sets.write_mixtral(Path(tmp) / "mixtral", vanilla),
                   "unipool-global": shape_sets.write_unipool(Path(tmp) / "global", fields, shape.layers,
                                                              shape.write_dtype)}
        for variant in variants:
            run = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--child",
                                  str(folders[variant.removesuffix("-worker")]), shape.dtype,
                                  "worker" if variant.endswith("-worker") else "plain"], capture_output=True, text=True)
            lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
            if run.returncode or not lines:
                sys.exit(f"{variant}: the profiled engine failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
            results[variant] = json.loads(lines[-1][len("RESULT "):])
    for variant, r in results.items():
        print(f"== {variant}: {r['ms_per_token_unprofiled']:.3f} ms per token (one generate, unprofiled)")
        print(f"{'op':<60} {'calls':>7} {'self us/token':>14} {'total us/token':>15}")
        for o in r["ops"][:args.top]:
            print(f"{o['op'][:60]:<60} {o['calls']:>7} {o['self_us_per_token']:>14.1f} {o['total_us_per_token']:>15.1f}")
    data = {"benchmark": "profile_compiled_step", "args": vars(args), "shape": shape.describe(),
            **quiet.record(before),
            "statistic": "torch.profiler key_averages over one generate of one request, per generated token",
            "results": results}
    quiet.write_json(args.out, data)


if __name__ == "__main__":
    main()
