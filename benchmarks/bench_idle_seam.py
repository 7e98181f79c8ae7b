"""What the idle seam costs, measured inside one engine: the same engine, the same weights, modes alternated.

Engines started one after another on the same model differ by up to 40% on a 2-vCPU machine,
while repeats inside one engine agree within ~10%: an A/B across engines resolves nothing. So
here every comparison is made inside one engine, per model:

  unipool-global   our model, one global pool of E experts shared by all L layers
  mixtral          vLLM's MixtralForCausalLM at the same shapes, with the steering worker
                   installed (steering/family_hooks.py: gate hooks and router taps)

Each engine (compiled, vLLM's default; --eager for quick runs) has the steering worker, and
runs R rounds of three modes:

  idle           nobody steered: every step runs the plain variant (steering/idle_steps.py)
  seam           nobody steered, but IdleSteps.always_read on (set by RPC, benchmarks/seam_rpc.py):
                 every step runs the model, reading all-zero rows and copying the routing into
                 the capture buffers, as every step ran before the plain variant existed (the
                 old idle seam)
  half-steered   every other request of the batch steered, round-robin over three profiles (a
                 MASCing bias, an exclusion, an inclusion: bench_family_steering.py's); the
                 single request runs under the bias profile
  probed         nobody steered, every request scored by a routing probe (docs/probes.md): the
                 probe's cost on the step (the model runs, its layers copy the routing out; the
                 score after each step);
                 the probe is random and never fires (its cost does not depend on its weights)

Each mode measures a batched generate (--requests requests of --prompt random tokens, --tokens
new tokens each, greedy, ignore_eos) and then a single-request decode (--single-tokens new
tokens): wall time and CPU time (on-CPU time, user and system) of the worker, the engine core and
this driver (benchmarks/engine_layout.py). The modes run in order idle, seam, half-steered in even rounds and
reversed in odd ones (a slow drift then weighs on every mode alike), after one warm-up generate
per mode that is not counted. Each measurement also records how many steps ran each way
(model / plain variant), so the JSON shows each mode ran on the variant it names.

Reported per model, kind (batched, single) and mode: median output tokens/s over the rounds
(wall) and output tokens per worker CPU second; and per round the PAIRED ratios to idle of the
same round, mode / idle in throughput (idle time / mode time; < 1: the mode costs more), wall and
worker-CPU based, summarised as median, IQR and min-max over rounds.

Shape sets (benchmarks/shapes.py): `tiny` (per-op overhead dominates: where a seam's cost shows
most) and `big` (expert bytes dominate; the vanilla layout still fits 24 GiB).

The machine must be quiet (benchmarks/quiet.py; --force-noisy runs anyway and records noisy:
true); the engine's processes are pinned (benchmarks/engine_layout.py; --no-pin leaves them).

  .venv/bin/python benchmarks/bench_idle_seam.py --shape tiny --rounds 10 --out docs/results/idle-seam-tiny.json
  .venv/bin/python benchmarks/bench_idle_seam.py --smoke --force-noisy --out /tmp/idle-seam-smoke.json
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
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with our functions

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import quiet  # noqa: E402
from engine_layout import EngineLayout  # noqa: E402
from shapes import SHAPE_SETS, write_models  # noqa: E402

WORKER = "unipool_serve.model_executor.steering.worker.SteeringWorker"
MODELS = {"unipool-global": "global", "mixtral": "mixtral"}  # name -> shapes.write_models key
MODES = ("idle", "seam", "half-steered", "probed")
KINDS = ("batched", "single")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPE_SETS), default="tiny")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--single-tokens", type=int, default=96)
    p.add_argument("--eager", action="store_true", help="no torch.compile (quick runs; the served default compiles)")
    p.add_argument("--no-pin", action="store_true", help="leave the engine's processes where the kernel puts them")
    p.add_argument("--smoke", action="store_true", help="smoke shapes, 2 rounds, eager, a few tokens")
    p.add_argument("--out", type=Path, default=Path("docs/results/idle-seam.json"))
    quiet.add_arguments(p)
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.rounds, args.requests, args.prompt, args.tokens, args.single_tokens, args.eager = (
            "smoke", 2, 4, 8, 4, 4, True)
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}")
    return args


def profiles(folder: Path):
    """The three profiles of bench_family_steering.py: a bias, an exclusion, an inclusion."""
    import torch

    from unipool_serve.model_executor.steering.profile import SteeringProfile
    from unipool_serve.model_executor.steering.shape import SteerableModel

    shape = SteerableModel.from_folder(folder)
    gen = torch.Generator().manual_seed(0)
    return [
        SteeringProfile.for_config(shape, name="bias", bias=torch.randn(shape.num_layers, shape.num_experts,
                                                                       generator=gen), alpha=1.0),
        SteeringProfile.for_config(shape, name="exclude", exclude={l: [0] for l in range(shape.num_layers)}),
        SteeringProfile.for_config(shape, name="include", include={l: [1] for l in range(shape.num_layers)}),
    ]


PROBE = "bench-probe"


def probe(folder: Path):
    """A random routing probe of the model; its threshold of 1 never fires, so no request's routing changes."""
    import torch

    from unipool_serve.model_executor.steering.probe import RoutingProbe, moe_layers
    from unipool_serve.model_executor.steering.shape import SteerableModel

    shape = SteerableModel.from_folder(folder)
    weight = torch.randn(len(moe_layers(shape)), shape.num_experts, generator=torch.Generator().manual_seed(0))
    return RoutingProbe.for_model(shape, name=PROBE, weight=weight, bias=0.0, threshold=1.0)


class Engine:
    """One engine with the steering worker, and the measurements of one mode at a time."""

    def __init__(self, name: str, folder: Path, args):
        import torch
        from vllm import LLM

        from unipool_serve.model_executor.steering.offline import OfflineSteering

        self.name, self.args = name, args
        shape = SHAPE_SETS[args.shape]
        start = time.perf_counter()
        self.llm = LLM(model=str(folder), dtype=shape.dtype, enforce_eager=args.eager, max_model_len=512,
                       max_num_seqs=max(args.requests, 2), max_num_batched_tokens=2048, enable_prefix_caching=False,
                       seed=0, worker_cls=WORKER)
        self.start_s = time.perf_counter() - start
        self.layout = EngineLayout.find(pin=not args.no_pin)
        self.steering = OfflineSteering(self.llm)
        self.profiles = [p.name for p in profiles(folder) if self.steering.add(p)]
        self.steering.add_probe(probe(folder))
        gen = torch.Generator().manual_seed(0)
        self.prompts = [{"prompt_token_ids": torch.randint(3, 300, (args.prompt,), generator=gen).tolist()}
                        for _ in range(args.requests)]
        self.always_read = False

    def _set_always_read(self, on: bool) -> None:
        import seam_rpc

        if on != self.always_read:
            assert self.llm.collective_rpc(seam_rpc.set_always_read, args=(on,)) == [on]
            self.always_read = on

    def _steps(self) -> dict[str, int]:
        import seam_rpc

        return self.llm.collective_rpc(seam_rpc.steps_each_way)[0]

    def _params(self, mode: str, kind: str, tokens: int):
        from vllm import SamplingParams

        n = len(self.prompts) if kind == "batched" else 1
        if mode == "probed":
            return [SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, skip_reading_prefix_cache=True,
                                   extra_args=self.steering.extra_args(None, probes=(PROBE,))) for _ in range(n)], [None] * n
        if mode != "half-steered":
            names = [None] * n
        elif kind == "single":
            names = ["bias"]
        else:
            names = [self.profiles[i // 2 % len(self.profiles)] if i % 2 == 0 else None for i in range(n)]
        return [SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True,
                               extra_args=self.steering.extra_args(name) if name else None) for name in names], names

    def measure(self, mode: str, kind: str, tokens: int | None = None) -> dict:
        tokens = tokens or (self.args.tokens if kind == "batched" else self.args.single_tokens)
        self._set_always_read(mode == "seam")
        params, names = self._params(mode, kind, tokens)
        prompts = self.prompts[: len(params)]
        steps_before = self._steps()
        cpu_before = self.layout.cpu_times()
        start = time.perf_counter()
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
        cpu_after = self.layout.cpu_times()
        steps_after = self._steps()
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        assert generated == tokens * len(prompts), (generated, tokens, len(prompts))
        return {"mode": mode, "kind": kind, "requests": len(prompts), "steered": sum(n is not None for n in names),
                "output_tokens": generated, "wall_s": wall,
                "cpu_s": {k: cpu_after[k] - cpu_before[k] for k in cpu_after},
                "steps": {k: steps_after[k] - steps_before[k] for k in steps_after}}

    def stop(self) -> None:
        self._set_always_read(False)
        self.layout.release()
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:
            pass
        self.layout.wait_gone()
        del self.llm
        gc.collect()


def spread(values: list[float]) -> dict:
    """median, IQR (the 25th and 75th percentiles, inclusive method), min, max, n."""
    values = sorted(values)
    if not values:
        return {"n": 0}
    q1, q3 = (statistics.quantiles(values, n=4, method="inclusive")[i] for i in (0, 2)) if len(values) > 1 \
        else (values[0], values[0])
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "iqr": q3 - q1, "min": values[0],
            "max": values[-1], "n": len(values)}


def summarise(rows: list[dict]) -> dict:
    """Per kind: per mode the medians; per steered mode the paired ratios to idle of the same round."""
    out = {}
    for kind in KINDS:
        by = {(r["round"], r["mode"]): r for r in rows if r["kind"] == kind}
        rounds = sorted({r for r, _ in by})
        per_mode = {}
        for mode in MODES:
            mine = [by[(r, mode)] for r in rounds if (r, mode) in by]
            per_mode[mode] = {
                "tokens_per_s": spread([m["output_tokens"] / m["wall_s"] for m in mine]),
                "tokens_per_worker_cpu_s": spread([m["output_tokens"] / m["cpu_s"]["worker"] for m in mine
                                                   if m["cpu_s"]["worker"] > 0]),
                "steps": {w: sum(m["steps"][w] for m in mine) for w in ("read", "unread")},
            }
            if mode != "idle":
                pairs = [(by[(r, "idle")], by[(r, mode)]) for r in rounds if (r, "idle") in by and (r, mode) in by]
                per_mode[mode]["ratio_vs_idle_wall"] = spread([i["wall_s"] / m["wall_s"] for i, m in pairs])
                per_mode[mode]["ratio_vs_idle_worker_cpu"] = spread(
                    [i["cpu_s"]["worker"] / m["cpu_s"]["worker"] for i, m in pairs if m["cpu_s"]["worker"] > 0])
        out[kind] = per_mode
    return out


def steps_as_named(summary: dict) -> bool:
    """idle ran only the plain variant, seam and probed only the model, half-steered mostly the
    model (a step may hold only unsteered requests: vLLM's engine core starts on the first request
    of a batch before the rest arrive, so one may finish a step after the others)."""
    return all(s["idle"]["steps"]["read"] == 0 and s["seam"]["steps"]["unread"] == 0
               and s["half-steered"]["steps"]["read"] > s["half-steered"]["steps"]["unread"]
               and s["probed"]["steps"]["unread"] == 0
               for s in summary.values())


def run_engine(name: str, folder: Path, args) -> dict:
    engine = Engine(name, folder, args)
    print(f"[{name}] engine ready in {engine.start_s:.1f} s; layout {json.dumps(engine.layout.as_dict())}", flush=True)
    rows = []
    try:
        for mode in MODES:  # warm-up, not counted
            engine.measure(mode, "batched", tokens=min(8, args.tokens))
        for rnd in range(args.rounds):
            order = MODES if rnd % 2 == 0 else MODES[::-1]
            for position, mode in enumerate(order):
                for kind in KINDS:
                    row = engine.measure(mode, kind)
                    rows.append({"round": rnd, "position": position, **row})
                    print(f"[{name}] round {rnd} {mode:<13} {kind:<8} {row['wall_s']:7.3f} s wall, "
                          f"{row['cpu_s']['worker']:7.3f} s worker CPU, steps {row['steps']}", flush=True)
        pin_check = engine.layout.verify()
        layout = engine.layout.as_dict()
    finally:
        engine.stop()
    summary = summarise(rows)
    return {"model": name, "engine_start_s": engine.start_s, "layout": layout, "pin_check_at_end": pin_check,
            "profiles": engine.profiles, "steps_as_named": steps_as_named(summary), "summary": summary,
            "measurements": rows}


def print_table(results: list[dict]) -> None:
    print(f"\n{'model':<16}{'kind':<9}{'mode':<14}{'tok/s':>9}{'tok/CPU-s':>11}"
          f"{'vs idle, wall: median [IQR]':>31}{'vs idle, CPU: median [IQR]':>30}")
    for r in results:
        for kind, per_mode in r["summary"].items():
            for mode, s in per_mode.items():
                def ratio(key):
                    q = s.get(key)
                    return f"{q['median']:.3f} [{q['q1']:.3f}-{q['q3']:.3f}]" if q and q.get("n") else "-"
                cpu = s["tokens_per_worker_cpu_s"].get("median", float("nan"))
                print(f"{r['model']:<16}{kind:<9}{mode:<14}{s['tokens_per_s']['median']:>9.1f}{cpu:>11.1f}"
                      f"{ratio('ratio_vs_idle_wall'):>31}{ratio('ratio_vs_idle_worker_cpu'):>30}")
        if not r["steps_as_named"]:
            print(f"{r['model']}: SOME MODE DID NOT RUN ON THE VARIANT IT NAMES (see steps in the JSON)")


def main(argv=None) -> None:
    args = parse_args(argv)
    before = quiet.check(args.force_noisy, wait_s=args.wait_quiet)
    shape = SHAPE_SETS[args.shape]
    names = args.models.split(",")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_idle_seam_") as tmp:
        folders = write_models(Path(tmp), shape, tuple(MODELS[n] for n in names))
        for name in names:
            results.append(run_engine(name, folders[MODELS[name]], args))
    print_table(results)
    data = {"benchmark": "bench_idle_seam", "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "shape": shape.describe(), **quiet.record(before),
            "machine": {"platform": platform.platform(), "python": platform.python_version()},
            "statistic": "per mode: median over rounds of output tokens/s (wall) and output tokens per worker CPU "
                         "second; ratio_vs_idle_*: per round, idle time / mode time of the same round (throughput "
                         "ratio, < 1 = the mode costs more), summarised as median, IQR (inclusive quartiles), min-max",
            "results": results}
    quiet.write_json(args.out, data)


if __name__ == "__main__":
    main()
