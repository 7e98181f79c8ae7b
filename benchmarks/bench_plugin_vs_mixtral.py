"""Tokens/s of the UniPool vLLM plugin vs vLLM's built-in MixtralForCausalLM, same shapes.

Both models: L layers, hidden H, expert width F, top-k softmax routing renormalised
(Mixtral's rule), E experts per pool (ours) / per layer (Mixtral), same attention
shapes, same vocabulary, same engine settings. Variants run one after another in
this process (one engine at a time):

  mixtral             vLLM's MixtralForCausalLM (FusedMoE layer, per-layer experts)
  unipool-vanilla     ours, one pool per layer (same parameter count as Mixtral)
  unipool-global      ours, one global pool of E experts shared by all L layers
  unipool-global-nosteer  the same with UNIPOOL_STEERING=0 (routers skip the tables)

Usage:  .venv/bin/python benchmarks/bench_plugin_vs_mixtral.py [--out docs/bench_plugin_vs_mixtral.json]
Prints a table and writes JSON. Numbers are wall-clock on whatever machine runs it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


def shapes(args) -> dict:
    return dict(num_hidden_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.hidden // 64,
                num_key_value_heads=max(1, args.hidden // 256), head_dim=64, num_experts=args.experts,
                num_experts_per_tok=args.top_k, expert_intermediate_size=args.width, vocab_size=384,
                max_position_embeddings=1024)


def write_unipool(path: Path, args, layers_per_pool: int) -> Path:
    from unipool_serve.demo.tiny_model import write_tiny_model

    return write_tiny_model(path, seed=0, router_type="softmax", norm_topk_prob=True,
                            layers_per_pool=layers_per_pool, **shapes(args))


def write_mixtral(path: Path, args, tokenizer_from: Path) -> Path:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    s = shapes(args)
    config = MixtralConfig(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["expert_intermediate_size"],
        num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"], head_dim=64, num_local_experts=s["num_experts"],
        num_experts_per_tok=s["num_experts_per_tok"], max_position_embeddings=s["max_position_embeddings"],
        rope_theta=1e6, tie_word_embeddings=False, initializer_range=0.05, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    MixtralForCausalLM(config).to(torch.float32).save_pretrained(str(path))
    for f in tokenizer_from.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, path / f.name)
    return path


def run_variant(name: str, model: Path, args, env: dict) -> dict:
    from vllm import LLM, SamplingParams

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    t0 = time.perf_counter()
    llm = LLM(model=str(model), dtype=args.dtype, enforce_eager=not args.compile, max_model_len=512,
              max_num_seqs=args.batch, max_num_batched_tokens=2048, enable_prefix_caching=False, seed=0)
    start_s = time.perf_counter() - t0
    for k, v in old.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    import torch

    gen = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(3, 300, (args.prompt_len,), generator=gen).tolist()}
               for _ in range(args.batch)]
    params = SamplingParams(temperature=0.0, max_tokens=args.gen_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t)
        assert all(len(o.outputs[0].token_ids) == args.gen_len for o in outs)
    with_decode = args.batch * args.gen_len
    median = statistics.median(times)
    # decode-only view: one request, the same number of new tokens
    t = time.perf_counter()
    llm.generate(prompts[:1], params, use_tqdm=False)
    single_s = time.perf_counter() - t
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()
    return {"variant": name, "engine_start_s": round(start_s, 1), "batch_times_s": [round(x, 3) for x in times],
            "batch_output_tok_s": round(with_decode / median, 1),
            "batch_total_tok_s": round((with_decode + args.batch * args.prompt_len) / median, 1),
            "single_request_output_tok_s": round(args.gen_len / single_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--width", type=int, default=512, help="expert width F")
    ap.add_argument("--experts", type=int, default=8, help="experts per pool (ours) / per layer (Mixtral)")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--compile", action="store_true", help="torch.compile (vLLM's default) instead of eager")
    ap.add_argument("--variants", default="mixtral,unipool-vanilla,unipool-global,unipool-global-nosteer")
    ap.add_argument("--out", default="docs/bench_plugin_vs_mixtral.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_plugin_"))
    vanilla = write_unipool(work / "unipool_vanilla", args, layers_per_pool=1)
    models = {
        "mixtral": (lambda: write_mixtral(work / "mixtral", args, vanilla), {}),
        "unipool-vanilla": (lambda: vanilla, {}),
        "unipool-global": (lambda: write_unipool(work / "unipool_global", args, args.layers), {}),
        "unipool-global-nosteer": (lambda: write_unipool(work / "unipool_global", args, args.layers),
                                   {"UNIPOOL_STEERING": "0"}),
    }
    results = []
    for name in args.variants.split(","):
        make, env = models[name]
        results.append(run_variant(name, make(), args, env))
        print(json.dumps(results[-1]), flush=True)

    base = next((r for r in results if r["variant"] == "mixtral"), None)
    print(f"\n{'variant':<26}{'batch out tok/s':>16}{'batch total tok/s':>19}{'1-req out tok/s':>17}{'vs mixtral':>12}")
    for r in results:
        ratio = r["batch_output_tok_s"] / base["batch_output_tok_s"] if base else float("nan")
        r["ratio_vs_mixtral"] = round(ratio, 3)
        print(f"{r['variant']:<26}{r['batch_output_tok_s']:>16}{r['batch_total_tok_s']:>19}"
              f"{r['single_request_output_tok_s']:>17}{ratio:>12.3f}")
    meta = {"args": vars(args), "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "load_avg_at_end": os.getloadavg()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
