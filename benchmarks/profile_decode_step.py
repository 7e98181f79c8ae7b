"""Where one decode step's time goes, per layer: router GEMV, routing, steering, routing counts and
capture, the expert computation, attention, and what is outside the model (the worker's hook,
vLLM's input preparation and sampling).

Each variant runs in its own Python process (`--variant` re-invokes this script), eager (no
torch.compile: a compiled graph fuses the ops and cannot be split into these parts; the compiled
step is what bench_idle_seam.py and bench_plugin_vs_mixtral.py time), with vLLM's engine core and
worker in that process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so wrappers around our modules and
vLLM's see every call. Each wrapper adds its wall time, minus that of the wrappers it encloses
(exclusive time), to its part, for decode steps only (a forward of at most one token per
request). On the CPU every op is synchronous, so wall time per call is the op time.

Variants (benchmarks/shapes.py's shape set):
  mixtral              vLLM's MixtralForCausalLM: attention, gate, FusedMoE (routing and experts in one)
  unipool-vanilla      ours, one pool per layer
  unipool-global       ours, one global pool, nobody steered (the idle variant runs)
  unipool-global-seam  the same, with the tables read every step (IdleSteps.always_read: the cost
                       the idle variant removes)
  unipool-global-half  half the requests steered over three profiles
  unipool-global-nosteer  UNIPOOL_STEERING=0

Usage:  .venv/bin/python benchmarks/profile_decode_step.py --shape tiny --out docs/results/decode-step-profile-tiny.json
Prints one table per batch size (microseconds per decode step per layer, and per step outside
the layers) and writes JSON. The wrappers cost time themselves (about 1 us per call, measured
by --calibrate and reported), so compare parts across variants, not the sums with the timed
benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import shapes as shape_sets  # noqa: E402

VARIANTS = ("mixtral", "unipool-vanilla", "unipool-global", "unipool-global-seam", "unipool-global-half",
            "unipool-global-nosteer")
WORKER = "unipool_serve.model_executor.steering.worker.SteeringWorker"
VARIANT_ENV = {"unipool-global-nosteer": {"UNIPOOL_STEERING": "0"}}  # set before the engine starts


class PartTimer:
    """Exclusive wall time per part, decode steps only."""

    def __init__(self):
        self.total_ns: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.stack: list[list] = []  # [part, start_ns, enclosed_ns]
        self.decode = False
        self.steps = 0

    def wrap(self, owner, attribute: str, part: str) -> None:
        original = getattr(owner, attribute)
        timer = self

        def timed(*args, **kwargs):
            timer.stack.append([part, time.perf_counter_ns(), 0])
            try:
                return original(*args, **kwargs)
            finally:
                name, start, enclosed = timer.stack.pop()
                spent = time.perf_counter_ns() - start
                if timer.stack:
                    timer.stack[-1][2] += spent
                if timer.decode:
                    timer.total_ns[name] += spent - enclosed
                    timer.calls[name] += 1

        setattr(owner, attribute, timed)

    def wrap_step(self, owner, attribute: str, batch: int) -> None:
        """The model runner's step: decode when it computes at most one token per request."""
        original = getattr(owner, attribute)
        timer = self

        def step(runner, scheduler_output, *args, **kwargs):
            timer.decode = 0 < scheduler_output.total_num_scheduled_tokens <= batch and all(
                n == 1 for n in scheduler_output.num_scheduled_tokens.values())
            timer.steps += timer.decode
            timer.stack.append(["outside the model", time.perf_counter_ns(), 0])
            try:
                return original(runner, scheduler_output, *args, **kwargs)
            finally:
                name, start, enclosed = timer.stack.pop()
                if timer.decode:
                    timer.total_ns[name] += time.perf_counter_ns() - start - enclosed
                    timer.calls[name] += 1

        setattr(owner, attribute, step)


def instrument(timer: PartTimer, batch: int, variant: str) -> None:
    """Wrap the parts of our model and of vLLM's Mixtral (classes: before the engine builds them)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    # sampling (sample_tokens, after execute_model) is not timed: the same for every variant
    timer.wrap_step(GPUModelRunner, "execute_model", batch)
    if variant == "mixtral":
        return  # its parts are wrapped on the loaded model (wrap_mixtral): its MoE layer's class is chosen at build
    from unipool_serve.kernels import routing_reference
    from unipool_serve.model_executor import moe_backend, router, routing_capture, routing_counts, vllm_model
    from unipool_serve.model_executor.steering import table, worker

    timer.wrap(vllm_model.UniPoolAttention, "forward", "attention")
    timer.wrap(vllm_model.UniPoolMoE, "forward", "MoE glue")
    timer.wrap(vllm_model.UniPoolForCausalLM, "forward", "model glue")
    timer.wrap(router.PoolRouter, "logits", "router GEMV")
    timer.wrap(router.PoolRouter, "route", "steering gather + casts")
    timer.wrap(routing_reference, "route", "routing (top-k, weights)")
    timer.wrap(table.SteeringTable, "view", "steering view")
    timer.wrap(routing_counts.RoutingCounts, "record", "routing counts")
    timer.wrap(routing_capture.RoutingCapture, "record", "routing capture")
    for backend in (moe_backend.CpuBackend, moe_backend.TorchBackend):
        timer.wrap(backend, "__call__", "experts (pool MoE)")
    timer.wrap(worker.V1StepHook, "write", "steering hook (index fill)")
    timer.wrap(worker.V1StepHook, "collect", "steering hook (collect)")


TIMER = PartTimer()  # the variant process's one timer: the engine runs in this process


def wrap_mixtral(worker) -> int:
    """Run in the worker (here: this process): wrap the loaded Mixtral's attention, gate and MoE layer
    instances; returns how many MoE layers were found."""
    model, found = worker.model_runner.get_model(), 0
    for module in model.modules():
        name = type(module).__name__
        if name == "MixtralAttention":
            TIMER.wrap(module, "forward", "attention")
        elif name == "MixtralMoE":
            TIMER.wrap(module, "forward", "MoE glue")
            TIMER.wrap(module.gate, "forward", "router GEMV")
            TIMER.wrap(module.experts, "forward", "experts + routing (FusedMoE)")
            found += 1
    return found


PER_LAYER = {"attention", "MoE glue", "router GEMV", "steering gather + casts", "routing (top-k, weights)",
             "steering view", "routing counts", "routing capture", "experts (pool MoE)",
             "experts + routing (FusedMoE)"}


def run_one(args) -> dict:
    """Inside the variant's own process."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc(wrap_mixtral)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.update(VARIANT_ENV.get(args.variant, {}))
    import torch
    from vllm import LLM, SamplingParams

    shape = shape_sets.SHAPE_SETS[args.shape]
    timer = TIMER
    instrument(timer, args.batch, args.variant)
    ours = args.variant != "mixtral"
    llm = LLM(model=args.model, dtype=shape.dtype, enforce_eager=True, max_model_len=512, max_num_seqs=max(args.batch, 2),
              max_num_batched_tokens=2048, enable_prefix_caching=False, seed=0,
              **({"worker_cls": WORKER} if ours else {}))
    extra = [None] * args.batch
    if not ours:
        assert llm.collective_rpc(wrap_mixtral) == [shape.layers]
    if ours:
        from bench_idle_seam import profiles

        from unipool_serve.model_executor.steering.offline import OfflineSteering

        steering = OfflineSteering(llm)
        names = [p.name for p in profiles(Path(args.model)) if steering.add(p)]
        if args.variant == "unipool-global-half":
            extra = [steering.extra_args(names[i // 2 % len(names)]) if i % 2 == 0 else None for i in range(args.batch)]
            if args.batch == 1:
                extra = [steering.extra_args(names[0])]
        if args.variant == "unipool-global-seam":
            import seam_rpc

            assert llm.collective_rpc(seam_rpc.set_always_read, args=(True,)) == [True]
    gen = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(3, 300, (args.prompt_len,), generator=gen).tolist()}
               for _ in range(args.batch)]
    params = [SamplingParams(temperature=0.0, max_tokens=args.gen_len, ignore_eos=True, extra_args=e) for e in extra]
    llm.generate(prompts, params, use_tqdm=False)  # warm-up: allocations, first-call paths
    timer.total_ns.clear(), timer.calls.clear()
    timer.steps = 0
    start = time.perf_counter_ns()
    for _ in range(args.repeats):
        llm.generate(prompts, params, use_tqdm=False)
    wall_ns = time.perf_counter_ns() - start
    steps, layers = timer.steps, shape.layers
    parts = {}
    for part, ns in timer.total_ns.items():
        per_layer = part in PER_LAYER
        parts[part] = {"us_per_step": ns / steps / 1e3, "us_per_layer": ns / steps / layers / 1e3 if per_layer else None,
                       "calls_per_step": timer.calls[part] / steps}
    return {"variant": args.variant, "batch": args.batch, "decode_steps": steps, "layers": layers,
            "generate_wall_s": wall_ns / 1e9, "torch_threads": torch.get_num_threads(), "parts": parts}


def calibrate() -> float:
    """A wrapper's own cost per call (us): an empty function, wrapped, called a million times."""
    timer = PartTimer()
    timer.decode = True

    class Empty:
        def f(self):
            return None

    timer.wrap(Empty, "f", "empty")
    e = Empty()
    start = time.perf_counter_ns()
    for _ in range(1_000_000):
        e.f()
    return (time.perf_counter_ns() - start) / 1e6 / 1e3


def print_table(results: list[dict]) -> None:
    for batch in sorted({r["batch"] for r in results}):
        rows = [r for r in results if r["batch"] == batch]
        parts = sorted({p for r in rows for p in r["parts"]}, key=lambda p: (p not in PER_LAYER, p))
        print(f"\nbatch {batch}: us per decode step (per layer for the per-layer parts)")
        print(f"{'part':<30}" + "".join(f"{r['variant']:>24}" for r in rows))
        for part in parts:
            cells = []
            for r in rows:
                p = r["parts"].get(part)
                value = None if p is None else (p["us_per_layer"] if p["us_per_layer"] is not None else p["us_per_step"])
                cells.append(f"{'-' if value is None else f'{value:.1f}':>24}")
            print(f"{part + (' /layer' if part in PER_LAYER else ''):<30}" + "".join(cells))
        totals = [sum(p["us_per_step"] for p in r["parts"].values()) for r in rows]
        print(f"{'sum of parts per step':<30}" + "".join(f"{t:>24.1f}" for t in totals))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=sorted(shape_sets.SHAPE_SETS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--gen-len", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="decode-step-profile.json")
    ap.add_argument("--force-noisy", action="store_true")
    ap.add_argument("--wait-quiet", type=float, default=0)
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # inside a variant's process
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.variant:
        Path(args.result).write_text(json.dumps(run_one(args)))
        return
    import quiet

    before = quiet.check(args.force_noisy, wait_s=args.wait_quiet)
    shape = shape_sets.SHAPE_SETS[args.shape]
    variants = args.variants.split(",")
    kinds = {"mixtral"} if "mixtral" in variants else set()
    kinds |= {"vanilla"} if "unipool-vanilla" in variants else set()
    kinds |= {"global"} if any(v.startswith("unipool-global") for v in variants) else set()
    results = []
    with tempfile.TemporaryDirectory(prefix="profile_step_") as work:
        folders = shape_sets.write_models(Path(work), shape, tuple(sorted(kinds)))
        for batch in [int(b) for b in args.batches.split(",")]:
            for variant in variants:
                folder = folders["mixtral" if variant == "mixtral" else
                                 "vanilla" if variant == "unipool-vanilla" else "global"]
                result = Path(work) / f"{variant}-{batch}.json"
                cmd = [sys.executable, __file__, "--shape", args.shape, "--variant", variant, "--model", str(folder),
                       "--batch", str(batch), "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len),
                       "--repeats", str(args.repeats), "--result", str(result)]
                run = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                if run.returncode != 0:
                    sys.exit(f"{variant} at batch {batch} failed:\n{run.stderr[-3000:]}")
                results.append(json.loads(result.read_text()))
                print(json.dumps({k: results[-1][k] for k in ("variant", "batch", "decode_steps", "generate_wall_s")}),
                      flush=True)
    print_table(results)
    data = {"benchmark": "profile_decode_step", "args": vars(args), "shape": shape.describe(),
            **quiet.record(before),
            "wrapper_cost_us_per_call": calibrate(),
            "machine": {"platform": platform.platform(), "python": platform.python_version()},
            "statistic": "exclusive wall time of each part summed over the decode steps of --repeats generates, "
                         "divided by the decode steps (and by the layers for per-layer parts); eager engine",
            "results": results}
    quiet.write_json(args.out, data)


if __name__ == "__main__":
    main()
