"""Model-level decode step of the torch reference model with our kernels, against the HBM roofline.

One decode step of B sequences (one new token each, a KV cache of `--context`
tokens) through `UniPoolForCausalLM` (transformers attention, our routers) with the
pool MoE computed by:
  fused      kernels/fused_moe.fused_pool_moe (Triton)
  torch-loop kernels/moe_reference.pool_moe (one F.linear pair per touched expert)

Roofline per step (docs/field-notes.md sections 7-8): bytes = non-expert weights read
+ sum over layers of u_l x expert bytes (u_l = distinct experts layer l touched in
that step, counted from the step's own routing) + KV cache read; time = bytes /
bandwidth, for the measured copy bandwidth and for the nominal HBM bandwidth.
Random weights with the 469M UniPool shapes (H 1024, 24 layers, one pool of 192
experts of width 4096, top-1, NormRouter); routing of random weights is near uniform,
so u_l is near M (1 - (1 - 1/M)^B).

    python benchmarks/bench_decode_step.py                    # CUDA GPU, bf16, batch 1 8 64
    python benchmarks/bench_decode_step.py --batch 1 8 --steps 10 --out /tmp/d.json
Needs torch, triton and transformers (no vLLM). Writes docs/results/decode-step-<GPU>.json.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import statistics
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOMINAL_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # bytes/s, SXM datasheets
SHAPE_469M = dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  num_key_value_heads=4, head_dim=64, num_experts=192, num_experts_per_tok=1,
                  expert_intermediate_size=4096, router_type="norm", max_position_embeddings=4096)


def import_package():
    """`unipool_serve` if installed, else the repository folders mapped onto that namespace."""
    try:
        import unipool_serve.model_executor.reference.model  # noqa: F401
        return
    except ImportError:
        pass
    pkg = types.ModuleType("unipool_serve")
    pkg.__path__ = []
    sys.modules["unipool_serve"] = pkg
    for sub in ("kernels", "model_executor"):
        spec = importlib.util.spec_from_file_location(f"unipool_serve.{sub}", REPO / sub / "__init__.py",
                                                      submodule_search_locations=[str(REPO / sub)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--context", type=int, default=512, help="tokens already in each sequence's KV cache")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per point (median reported)")
    p.add_argument("--impls", default="fused,torch-loop")
    p.add_argument("--out", type=Path, help="JSON path (default docs/results/decode-step-<GPU>.json)")
    return p.parse_args(argv)


def copy_bandwidth(torch) -> float:
    from triton.testing import do_bench

    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")  # 256 MiB, far past L2
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def step_bytes(model, config, batch: int, context: int, u_per_layer: list[int]) -> dict:
    esize = 2  # bf16
    expert = 3 * config.hidden_size * config.expert_intermediate_size * esize
    pool_params = sum(p.numel() for pool in model.model.pools for p in pool.parameters())
    embed = model.model.embed_tokens.weight.numel()
    other = (sum(p.numel() * p.element_size() for p in model.parameters()) - pool_params * esize
             - embed * esize + batch * config.hidden_size * esize)  # embedding: only B rows are read
    kv = batch * context * config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * esize
    experts = sum(u_per_layer) * expert
    return {"non_expert": other, "experts": experts, "kv": kv, "total": other + experts + kv,
            "pools": len(model.model.pools)}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_decode_step.py needs a CUDA GPU (the Triton kernels and HBM are what it measures)")
    import_package()
    from transformers.cache_utils import DynamicCache

    from unipool_serve.kernels.fused_moe import fused_pool_moe
    from unipool_serve.kernels.moe_reference import pool_moe
    from unipool_serve.kernels.routing_reference import route
    from unipool_serve.model_executor.config import UniPoolConfig
    from unipool_serve.model_executor.reference.model import UniPoolForCausalLM

    torch.manual_seed(0)
    config = UniPoolConfig(**SHAPE_469M)
    model = UniPoolForCausalLM(config).to("cuda", torch.bfloat16).eval()
    for router in model.model.routers:
        router.float()  # routers stay fp32, as in every checkpoint
    device = torch.cuda.get_device_name()
    nominal = next((v for k, v in NOMINAL_BANDWIDTH.items() if k in device), None)
    measured_bw = copy_bandwidth(torch)
    impls = {"fused": fused_pool_moe, "torch-loop": pool_moe}
    rows = []
    for batch in args.batch:
        prompt = torch.randint(3, config.vocab_size, (batch, args.context), device="cuda")
        for name in args.impls.split(","):
            model.set_experts_fn(impls[name])
            with torch.inference_mode():
                cache = DynamicCache(config=config)
                out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
                times, us = [], []
                for step in range(args.steps + 3):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    out = model(input_ids=token, past_key_values=cache, use_cache=True, output_router_logits=True)
                    end.record()
                    torch.cuda.synchronize()
                    token = out.logits[:, -1:].argmax(-1)
                    if step >= 3:  # warm-up: Triton compiles on first use
                        times.append(start.elapsed_time(end))
                        u = []
                        for layer, logits in zip(model.model.layers, out.router_logits):
                            ids, _ = route(logits, config.num_experts_per_tok, config.router_type,
                                           norm_scale=layer.moe.router.norm_scale, norm_c=config.norm_router_c)
                            u.append(int(torch.unique(ids).numel()))
                        us.append(u)
            u_mean = [statistics.mean(col) for col in zip(*us)]
            nbytes = step_bytes(model, config, batch, args.context + args.steps // 2, u_mean)
            ms = statistics.median(times)
            row = {"impl": name, "batch": batch, "context": args.context, "ms": ms, "ms_all": times,
                   "u_mean": statistics.mean(u_mean), "u_uniform": config.num_experts * (1 - (1 - 1 / config.num_experts) ** batch),
                   "bytes": nbytes, "roofline_ms_measured_bw": nbytes["total"] / measured_bw * 1e3,
                   "roofline_ms_nominal_bw": nbytes["total"] / nominal * 1e3 if nominal else None}
            row["fraction_of_roofline"] = row["roofline_ms_measured_bw"] / ms
            rows.append(row)
            print(f"{name:<11} B={batch:<4} {ms:8.2f} ms/step  u_l {row['u_mean']:6.1f}  "
                  f"bytes {nbytes['total'] / 1e9:6.2f} GB  roofline {row['roofline_ms_measured_bw']:6.2f} ms "
                  f"({row['fraction_of_roofline']:.0%})", flush=True)
    data = {"date": datetime.date.today().isoformat(), "device": device, "torch": torch.__version__,
            "copy_bandwidth_bytes_per_s": measured_bw, "nominal_bandwidth_bytes_per_s": nominal,
            "shape": SHAPE_469M, "args": {k: str(v) for k, v in vars(args).items()}, "results": rows}
    out = args.out or REPO / "docs" / "results" / f"decode-step-{device.replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
