"""Throughput of per-request steering on vLLM's own MoE families (Mixtral, Qwen3-MoE), vLLM CPU.

For each family, three variants on the same tiny checkpoint (written with transformers' own
classes), one engine at a time, in this one process:

  plain            vLLM as it is (no steering worker)
  worker-idle      the steering worker (gate hooks and router taps installed), no request steered
  worker-steered   the steering worker, half of the requests steered across three profiles

Each variant generates `--requests` requests of `--prompt` + `--tokens` tokens (greedy,
ignore_eos) `--repeats` times after one warm-up round; an engine's rate is the median output
tokens/s over the repeats. Engines of one variant differ from start to start, so each variant is
started `--engines` times, interleaved (plain, idle, steered, plain, ...); a variant's rate is
the median over its engines, with their spread, and the ratios are against plain's, from the
medians and per round. `--huge-pages` runs every engine with THP_MEM_ALLOC_ENABLE=1 (torch's
large tensors on transparent huge pages: a steadier placement, docs/benchmarks.md). Compiled by default
(vLLM CPU's torch.compile); --eager for quick runs; --smoke for a tiny, one-repeat check.
The steered variant also checks, on the routing counts, that its exclude and include profiles
are honoured (under torch.compile the gate hooks are traced into the graph).
Beside each rate, the worker's CPU time (user+system) per generated token. The machine must be
quiet (benchmarks/quiet.py; --force-noisy runs anyway, recorded as noisy), and the engine's
processes are pinned (benchmarks/engine_layout.py; --no-pin leaves them where they start).

Usage:  .venv/bin/python benchmarks/bench_family_steering.py [--out docs/bench_family_steering.json]
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

import quiet  # noqa: E402
from engine_layout import EngineLayout  # noqa: E402

WORKER = "unipool_serve.model_executor.steering.worker.SteeringWorker"
FAMILIES = ("MixtralForCausalLM", "Qwen3MoeForCausalLM")
VARIANTS = ("plain", "worker-idle", "worker-steered")


def write_model(folder: Path, arch: str, args) -> Path:
    from unipool_serve.demo.tiny_families import write_family_model

    width = dict(intermediate_size=args.width) if arch == "MixtralForCausalLM" else dict(moe_intermediate_size=args.width)
    return write_family_model(folder / arch, arch, seed=0, num_hidden_layers=args.layers, hidden_size=args.hidden,
                              num_attention_heads=args.hidden // 64, head_dim=64, num_experts_per_tok=args.top_k,
                              **width)


def profiles(folder: Path):
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


def run_variant(folder: Path, variant: str, args) -> dict:
    from vllm import LLM, SamplingParams

    from unipool_serve.model_executor.steering.offline import OfflineSteering

    kwargs = {} if variant == "plain" else {"worker_cls": WORKER}
    llm = LLM(model=str(folder), dtype="float32", enforce_eager=args.eager, max_model_len=512,
              max_num_seqs=args.requests, max_num_batched_tokens=2048, enable_prefix_caching=False, seed=0, **kwargs)
    layout = EngineLayout.find(pin=not args.no_pin)
    names = [None] * args.requests
    if variant == "worker-steered":
        steering = OfflineSteering(llm)
        loaded = [p.name for p in profiles(folder) if steering.add(p)]
        names = [loaded[i // 2 % 3] if i % 2 == 0 else None for i in range(args.requests)]
    params = [SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True,
                             extra_args=steering.extra_args(n) if n else None) for n in names]
    prompt = [{"prompt_token_ids": [3 + (7 * i + j) % 300 for j in range(args.prompt)]} for i in range(args.requests)]
    rates, cpu_per_token = [], []
    for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
        cpu = layout.cpu_times()["worker"]
        start = time.perf_counter()
        outs = llm.generate(prompt, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        if repeat:
            rates.append(tokens / seconds)
            cpu_per_token.append((layout.cpu_times()["worker"] - cpu) / tokens)
    result = {"tokens_per_s": rates, "median": statistics.median(rates), "worker_cpu_s_per_token": cpu_per_token,
              "median_worker_cpu_s_per_token": statistics.median(cpu_per_token)}
    if variant == "worker-steered":
        result["steering_honoured"] = steering_honoured(llm, steering, args)
    result.update(layout=layout.as_dict(), pin_check=layout.verify())
    layout.release()
    llm.llm_engine.engine_core.shutdown()
    layout.wait_gone()
    del llm
    gc.collect()
    return result


def over_engines(engines: list[dict], plain: list[dict]) -> dict:
    """A variant over its engines: the median of their medians, the spread (max - min) / median, the
    ratio to plain's median and per round (engine i / plain's engine i)."""
    rates = [e["median"] for e in engines]
    median = statistics.median(rates)
    out = {"engines": engines, "median": median, "min": min(rates), "max": max(rates),
           "spread": (max(rates) - min(rates)) / median,
           "median_worker_cpu_s_per_token": statistics.median(e["median_worker_cpu_s_per_token"] for e in engines),
           "ratio": median / statistics.median(p["median"] for p in plain),
           "ratio_per_round": [e["median"] / p["median"] for e, p in zip(engines, plain)]}
    if "steering_honoured" in engines[0]:
        out["steering_honoured"] = all(e["steering_honoured"] for e in engines)
    return out


def steering_honoured(llm, steering, args) -> bool:
    """The exclude and include profiles, alone, checked on the routing counts (compiled graphs too)."""
    import torch
    from vllm import SamplingParams

    def counts():
        return torch.tensor(llm.collective_rpc("unipool_routing_stats")[0])  # [L, E]

    prompt = [{"prompt_token_ids": [3 + j for j in range(args.prompt)]}]
    computed = args.prompt + args.tokens - 1
    ok = True
    for name, expert, expected in (("exclude", 0, 0), ("include", 1, computed)):
        before = counts()
        llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True,
                                            extra_args=steering.extra_args(name)), use_tqdm=False)
        ok &= bool(((counts() - before)[:, expert] == expected).all())
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--engines", type=int, default=1, help="engines per variant, interleaved (default 1)")
    parser.add_argument("--huge-pages", action="store_true", help="every engine with THP_MEM_ALLOC_ENABLE=1")
    parser.add_argument("--eager", action="store_true", help="no torch.compile (quick, not the goal's setting)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, eager, one repeat: checks the script runs")
    parser.add_argument("--no-pin", action="store_true", help="leave the engine's processes where the kernel puts them")
    parser.add_argument("--out", type=Path)
    quiet.add_arguments(parser)
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.hidden, args.width, args.requests, args.prompt, args.tokens, args.repeats, args.eager = (
            2, 64, 64, 4, 8, 8, 1, True)
    before = quiet.check(args.force_noisy, wait_s=args.wait_quiet)
    if args.huge_pages:  # inherited by every engine process started below
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in FAMILIES:
            folder = write_model(Path(tmp), arch, args)
            runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
            for _ in range(args.engines):
                for variant in VARIANTS:
                    runs[variant].append(run_variant(folder, variant, args))
            results[arch] = {v: over_engines(engines, runs["plain"]) for v, engines in runs.items()}
    print(f"{'family':<22} {'variant':<16} {'median tok/s':>13} {'spread':>7} {'vs plain':>9} {'per round':>20} "
          f"{'CPU ms/tok':>11}")
    for arch, by_variant in results.items():
        for variant, r in by_variant.items():
            honoured = {True: "  steering honoured", False: "  STEERING NOT HONOURED"}.get(r.get("steering_honoured"), "")
            rounds = ",".join(f"{x:.2f}" for x in r["ratio_per_round"])
            print(f"{arch:<22} {variant:<16} {r['median']:>13.1f} {r['spread']:>7.1%} {r['ratio']:>9.3f} {rounds:>20} "
                  f"{1000 * r['median_worker_cpu_s_per_token']:>11.3f}{honoured}")
    if args.out:
        meta = {k: getattr(args, k) for k in ("layers", "hidden", "width", "top_k", "requests", "prompt", "tokens",
                                              "repeats", "engines", "huge_pages", "eager", "smoke", "no_pin")}
        meta.update(machine=platform.machine(), cpus=os.cpu_count(), load_avg=os.getloadavg(),
                    statistic="median output tokens/s over repeats (one warm-up round not counted); worker CPU "
                              "s per token: the worker's user+system CPU time over the generated tokens",
                    noisy=before["noisy"], quiet_before=before, quiet_after=quiet.after(before))
        args.out.write_text(json.dumps({"settings": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
