"""Expert-pool bytes per pipeline stage: global, grouped and per-layer pools at PP=1 and PP=2.

  python benchmarks/bench_pipeline_memory.py [--smoke] [--out docs/results/pipeline-memory.json]

Each layout is served by a vLLM CPU engine (fp32, eager) at PP=1 and at PP=2; every stage
reports the bytes of the pool parameters it holds (storage shared by several layers counts
once). Beside each measured number stands the closed form: the distinct pools of the
stage's layers x the bytes of one pool (E x 3 x F x H x 4 for fp32, F padded to 32).

A global pool is needed by every stage, so PP=2 stores it twice: the "total / PP=1" column
is the price of pipeline parallelism for that layout, 2.0 for a global pool and 1.0 for pools
whose layers all sit on one stage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "engine"))  # engine_checks: start_engine / stop_engine / env
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine: tiny models, and two ranks at PP=2
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model ships a function to the workers

WORKER = "unipool_serve.model_executor.steering.worker.SteeringWorker"
LAYOUTS = {  # name -> (layers_per_pool, layers_per_router)
    "global (1 pool, all layers)": (8, 1),
    "grouped (4 pools of 2 layers)": (2, 1),
    "per-layer (8 pools, vanilla MoE)": (1, 1),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="the global layout only, 4 layers, tiny pools, the engine core "
                   "in this process (engine_checks.start_engine): proves the script runs")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "pipeline-memory.json")
    return p.parse_args(argv)


def pool_bytes_per_stage(model_dir: Path, pp: int, in_process: bool = False) -> list[dict]:
    from engine_checks import env, start_engine, stop_engine

    from unipool_serve.model_executor.introspection import pool_report

    binding = "|".join(str(i) for i in range(pp))  # one OpenMP thread per rank: 2 ranks fit 2 cores
    with env(VLLM_CPU_OMP_THREADS_BIND=binding):
        # the steering worker, as `unipool-serve` runs it: it allocates a later stage's receive buffers
        llm = start_engine(model_dir, pipeline_parallel_size=pp, worker_cls=WORKER, in_process=in_process,
                           distributed_executor_backend="mp" if pp > 1 else None)
    try:
        stages = []
        for report in llm.apply_model(pool_report):
            held = {}  # (data_ptr, nbytes) -> nbytes: a pool shared by layers counts once
            for name, (ptr, nbytes, _, _) in report["param_sizes"].items():
                if name.startswith("model.pools."):
                    held[(ptr, nbytes)] = nbytes
            stages.append({"layers": [l["layer"] for l in report["layers"]],
                           "pools": sorted({l["pool"] for l in report["layers"]}),
                           "bytes": sum(held.values())})
        return stages
    finally:
        stop_engine(llm)


def main(argv=None) -> None:
    args = parse_args(argv)
    import tempfile

    from unipool_serve.demo.tiny_model import write_tiny_model
    from unipool_serve.model_executor.config import UniPoolConfig

    layers = 4 if args.smoke else 8
    size = dict(num_hidden_layers=layers, num_experts=8 if args.smoke else 16, hidden_size=64 if args.smoke else 256,
                expert_intermediate_size=64 if args.smoke else 512, num_experts_per_tok=2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (per_pool, per_router) in list(LAYOUTS.items())[:1 if args.smoke else None]:
            per_pool = min(per_pool, layers)
            model_dir = write_tiny_model(Path(tmp) / name.split()[0], seed=0, layers_per_pool=per_pool,
                                         layers_per_router=per_router, **size)
            config = UniPoolConfig.from_pretrained(str(model_dir))
            width = -(-config.expert_intermediate_size // 32) * 32
            one_pool = config.num_experts * 3 * width * config.hidden_size * 4
            single = pool_bytes_per_stage(model_dir, 1, in_process=args.smoke)[0]["bytes"]
            stages = pool_bytes_per_stage(model_dir, 2, in_process=args.smoke)
            for stage, measured in enumerate(stages):
                closed = len({config.layer_to_pool(l) for l in measured["layers"]}) * one_pool
                rows.append({"layout": name, "stage": stage, "layers": measured["layers"], "pools": measured["pools"],
                             "bytes": measured["bytes"], "closed_form": closed, "pp1_bytes": single,
                             "pp2_total_over_pp1": sum(s["bytes"] for s in stages) / single})
    print("| layout | stage | layers | pools | MiB held | closed form MiB | PP=2 total / PP=1 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['layout']} | {r['stage']} | {r['layers'][0]}-{r['layers'][-1]} | {r['pools']} | "
              f"{r['bytes'] / 2**20:.2f} | {r['closed_form'] / 2**20:.2f} | {r['pp2_total_over_pp1']:.2f} |")
    mismatches = [r for r in rows if r["bytes"] != r["closed_form"]]
    if mismatches:
        print(f"{len(mismatches)} stage(s) differ from the closed form")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"smoke": args.smoke, "sizes": size, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    if mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
