"""Expert budgets and pruned pools: quality against pool size, speed against the per-token budget.

  python benchmarks/bench_expert_budgets.py [--smoke] [--out docs/results/expert-budgets.json]

Part 1, quality vs pool size N (the bundled demo model, reference model, fp32): the pool is
pruned to its N most used experts (usage: a calibration run on the demo's calibration
prompts), then held-out perplexity of prose and code documents, and the code share of the
continuations of the 40 held-out code prompts, unsteered and under `prose`.

Part 2, speed vs budget k' (vLLM CPU engine, a random top-4 model of 32 experts: speed does
not depend on the weights' values): decode throughput of a batch whose every request runs
with budget k', side by side with k' = k in one run, as ratios. Dropped slots are skipped by
the MoE kernel, so the expert work per token falls with k'.

Part 3, memory vs N (closed form): pool bytes and, at a fixed memory budget, the KV-cache
tokens the smaller pools leave room for.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "engine"))  # engine_checks: start_engine / stop_engine


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: proves the script runs")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "expert-budgets.json")
    return p.parse_args(argv)


def quality_vs_pool_size(sizes: list[int], docs_per_kind: int, prompts: int) -> list[dict]:
    import torch

    from unipool_serve.demo.classifier import classify
    from unipool_serve.demo.corpus import CALIBRATION_SEED, HELDOUT_SEED, documents
    from unipool_serve.demo.eval import DEMO_MODEL_DIR, MAX_NEW_TOKENS, PROMPTS_CODE, greedy_continuations, load_demo
    from unipool_serve.model_executor.config import UniPoolConfig
    from unipool_serve.tools.convert.prune import prune_model
    from unipool_serve.model_executor.steering.profile import SteeringProfile
    from unipool_serve.tools.usage import usage_from_calibration

    torch.set_num_threads(1)
    config = UniPoolConfig.from_pretrained(str(DEMO_MODEL_DIR))
    work = Path(tempfile.mkdtemp(prefix="budgets-"))
    calibration = work / "calibration.jsonl"
    calibration.write_text("\n".join(json.dumps({"prompt": d}) for kind in ("prose", "code")
                                     for d in documents(kind, 40, CALIBRATION_SEED)))
    usage = usage_from_calibration(calibration, DEMO_MODEL_DIR, config, max_tokens=128)
    held_out = {kind: documents(kind, docs_per_kind, HELDOUT_SEED) for kind in ("prose", "code")}
    rows = []
    for n in sizes:
        folder = DEMO_MODEL_DIR if n == config.num_experts else work / f"pruned-{n}"
        if n != config.num_experts:
            prune_model(DEMO_MODEL_DIR, folder, n, usage)
        model, tokenizer = load_demo(folder)
        row = {"pool_size": n}
        for kind, texts in held_out.items():
            nll, count = 0.0, 0
            with torch.no_grad():
                for text in texts:
                    ids = tokenizer(text, return_tensors="pt").input_ids[:, :256]
                    logits = model(input_ids=ids).logits[0, :-1]
                    nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
                    count += ids.shape[1] - 1
            row[f"perplexity_{kind}"] = float(torch.tensor(nll / count).exp())
        prose = SteeringProfile.load(folder / "steering" / "prose.safetensors", model.config) \
            if (folder / "steering" / "prose.safetensors").exists() else None
        code_prompts = PROMPTS_CODE[:prompts]
        for label, profile in (("unsteered", None), ("prose", prose)):
            if label == "prose" and profile is None:
                row["code_share_prose"] = None
                continue
            kwargs = {} if profile is None else dict(bias_rows=profile.bias_rows(), mask_rows=profile.mask_rows())
            outs = greedy_continuations(model, tokenizer, code_prompts, min_new_tokens=MAX_NEW_TOKENS, **kwargs)
            row[f"code_share_{label}"] = sum(classify(o) == "code" for o in outs) / len(outs)
        rows.append(row)
    return rows


def speed_vs_budget(budgets: list[int], batch: int, tokens: int, repeats: int, in_process: bool = False) -> list[dict]:
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from engine_checks import start_engine, stop_engine
    from vllm import SamplingParams

    from unipool_serve.demo.tiny_model import write_tiny_model
    from unipool_serve.model_executor.steering.offline import OfflineSteering

    folder = write_tiny_model(Path(tempfile.mkdtemp(prefix="budget-model-")) / "model", seed=0, hidden_size=256,
                              num_experts=32, num_experts_per_tok=4, expert_intermediate_size=512,
                              router_type="softmax", norm_topk_prob=True)
    llm = start_engine(folder, worker_cls="unipool_serve.model_executor.steering.worker.SteeringWorker",
                       max_num_seqs=batch, in_process=in_process)
    try:
        steering = OfflineSteering(llm)
        prompts = [{"prompt_token_ids": [3 + (i * 7 + j) % 200 for j in range(32)]} for i in range(batch)]
        rates: dict[int, list[float]] = {k: [] for k in budgets}
        for _ in range(repeats):  # interleaved, so drift hits every budget alike
            for k in budgets:
                params = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0,
                                        extra_args=steering.extra_args(None, None if k == 4 else k))
                start = time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False)
                rates[k].append(batch * tokens / (time.perf_counter() - start))
    finally:
        stop_engine(llm)
    base = sorted(rates[4])[len(rates[4]) // 2]
    return [{"top_k": k, "output_tokens_per_s_median": sorted(r)[len(r) // 2], "ratio_to_k4": sorted(r)[len(r) // 2] / base,
             "samples": r} for k, r in rates.items()]


def memory_vs_pool_size(sizes: list[int], budget_gib: float = 1.0) -> list[dict]:
    from unipool_serve.demo.eval import DEMO_MODEL_DIR
    from unipool_serve.model_executor.config import UniPoolConfig

    config = UniPoolConfig.from_pretrained(str(DEMO_MODEL_DIR))
    H, F, L = config.hidden_size, config.expert_intermediate_size, config.num_hidden_layers
    kv_per_token = 2 * L * config.num_key_value_heads * config.head_dim * 4  # fp32 K and V
    other = sum(p.stat().st_size for p in DEMO_MODEL_DIR.glob("*.safetensors")) - config.num_experts * 3 * F * H * 4
    rows = []
    for n in sizes:
        pool = n * 3 * F * H * 4
        room = budget_gib * 2**30 - pool - other
        rows.append({"pool_size": n, "pool_bytes": pool, "kv_tokens_at_budget": int(room // kv_per_token),
                     "budget_gib": budget_gib})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = [16, 8] if args.smoke else [16, 12, 8, 6, 4]
    result = {
        "quality_vs_pool_size": quality_vs_pool_size(sizes, docs_per_kind=2 if args.smoke else 40,
                                                     prompts=2 if args.smoke else 40),
        "speed_vs_budget": speed_vs_budget([4, 2, 1], batch=4 if args.smoke else 32, tokens=4 if args.smoke else 48,
                                           repeats=1 if args.smoke else 5, in_process=args.smoke),
        "memory_vs_pool_size": memory_vs_pool_size(sizes, budget_gib=0.05),
        "smoke": args.smoke,
    }
    print("pool size | ppl prose | ppl code | code share unsteered | code share with prose")
    for r in result["quality_vs_pool_size"]:
        print(f"{r['pool_size']:9} | {r['perplexity_prose']:9.2f} | {r['perplexity_code']:8.2f} | "
              f"{r['code_share_unsteered']:20.2f} | {r['code_share_prose']}")
    print("budget k' | output tok/s (median) | ratio to k=4")
    for r in result["speed_vs_budget"]:
        print(f"{r['top_k']:9} | {r['output_tokens_per_s_median']:21.1f} | {r['ratio_to_k4']:.3f}")
    print("pool size | pool MiB | KV tokens in the same memory")
    for r in result["memory_vs_pool_size"]:
        print(f"{r['pool_size']:9} | {r['pool_bytes'] / 2**20:8.1f} | {r['kv_tokens_at_budget']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
