"""Sweep launch configs of the fused pool MoE on a CUDA GPU and write tuned JSON files.

For every shape (H, F, E, k) and token count T it times each candidate
MoELaunchConfig with triton.testing.do_bench (median, L2 flushed), checks the
winner against the torch reference, and writes
kernels/configs/E=..,H=..,F=..,k=..,dtype=..,device=<this GPU>.json
keyed by T, which kernels/launch_config.py then picks up.

    python benchmarks/tune_fused_moe.py                         # the bench shapes, bf16
    python benchmarks/tune_fused_moe.py --shape 1024,4096,192,1 --tokens 1 8 64 --quick
Needs torch and triton only (no vLLM). Each new config compiles once per kernel,
so a full sweep of one shape takes tens of minutes; --quick keeps ~1/10 of it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHAPES = ["1024,4096,192,1", "768,3072,96,1", "768,768,384,4"]  # H,F,E,k
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
TOLERANCE = 5e-2  # bf16 output vs the fp32-accumulating reference, O(1) activations

try:
    from unipool_serve.kernels import launch_config
    from unipool_serve.kernels.fused_moe import fused_pool_moe
    from unipool_serve.kernels.moe_reference import pool_moe
except ImportError:  # a bare checkout: use the repository's kernels/ folder
    sys.path.insert(0, str(REPO))
    from kernels import launch_config
    from kernels.fused_moe import fused_pool_moe
    from kernels.moe_reference import pool_moe

MoELaunchConfig = launch_config.MoELaunchConfig


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", action="append", help="H,F,E,k (repeatable); default: the bench shapes")
    p.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--out-dir", type=Path, default=REPO / "kernels" / "configs")
    p.add_argument("--quick", action="store_true", help="a small candidate set")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def shared_memory_limit() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)


def candidates(num_tokens: int, num_experts: int, top_k: int, elt: int, quick: bool):
    """Configs worth timing at this T: BLOCK_M near the rows an expert gets, tiles that fit in shared memory."""
    slots = num_tokens * top_k
    rows = -(-slots // max(1, min(num_experts, slots)))  # expected rows per touched expert
    fit_m = max(16, 1 << (rows - 1).bit_length())
    block_ms = sorted({m for m in (16, 32, 64, 128) if m <= max(16, 2 * fit_m)})
    space = dict(
        BLOCK_N=(64, 128) if quick else (32, 64, 128, 256),
        BLOCK_K=(64, 128) if quick else (32, 64, 128, 256),
        GROUP_M=(1, 16) if quick else (1, 8, 16),
        num_warps=(4, 8),
        num_stages=(3, 4) if quick else (2, 3, 4, 5),
    )
    limit = shared_memory_limit()
    for bm, bn, bk, group, warps, stages in itertools.product(block_ms, *space.values()):
        # gate_up keeps an A tile and two B tiles (gate, up) per pipeline stage.
        if (bm * bk + 2 * bk * bn) * elt * stages > limit:
            continue
        yield MoELaunchConfig(bm, bn, bk, group, warps, stages)


def routing(num_tokens, num_experts, top_k, gen):
    """Uniform routing with distinct experts per token (the untrained-router worst case for bytes)."""
    scores = torch.rand(num_tokens, num_experts, generator=gen, device="cuda")
    topk_ids = scores.topk(top_k, dim=-1).indices.to(torch.int32)  # [T, k]
    return topk_ids, torch.rand(num_tokens, top_k, generator=gen, device="cuda")


def tune_point(inputs, num_experts, top_k, quick):
    from triton.testing import do_bench

    hidden = inputs[0]
    best = None
    for config in candidates(hidden.shape[0], num_experts, top_k, hidden.element_size(), quick):
        try:
            ms = do_bench(lambda: fused_pool_moe(*inputs, config), warmup=5, rep=25, return_mode="median")
        except Exception as exc:  # out of resources or a compile failure: not a candidate
            print(f"    skip {config}: {type(exc).__name__}", file=sys.stderr)
            continue
        if best is None or ms < best[0]:
            best = (ms, config)
    if best is None:
        raise RuntimeError("no candidate config compiled and ran")
    return best


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_fused_moe: needs a CUDA device", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    device_name = launch_config.current_device_name()
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for spec in args.shape or SHAPES:
        H, F, E, k = (int(v) for v in spec.split(","))
        w_gate_up = (torch.randn(E, 2 * F, H, generator=gen, device="cuda") / H**0.5).to(dtype)  # [E, 2F, H]
        w_down = (torch.randn(E, H, F, generator=gen, device="cuda") / F**0.5).to(dtype)  # [E, H, F]
        tuned = {}
        for num_tokens in args.tokens:
            hidden = torch.randn(num_tokens, H, generator=gen, device="cuda").to(dtype)  # [T, H]
            topk_ids, topk_weights = routing(num_tokens, E, k, gen)
            inputs = (hidden, w_gate_up, w_down, topk_ids, topk_weights)
            ms, config = tune_point(inputs, E, k, args.quick)
            err = (fused_pool_moe(*inputs, config).float() - pool_moe(*inputs).float()).abs().max().item()
            if err > TOLERANCE:
                raise RuntimeError(f"T={num_tokens}: best config {config} is wrong (max abs err {err:.3g})")
            default_ms = _time_default(inputs, num_tokens, E, H, F, k, dtype)
            print(f"H={H} F={F} E={E} k={k} T={num_tokens:>6}: {ms:.4f} ms (default {default_ms:.4f} ms) {config}")
            tuned[str(num_tokens)] = config.to_json()
        path = args.out_dir / launch_config.config_file_name(E, H, F, k, dtype, device_name)
        path.write_text(json.dumps(tuned, indent=1) + "\n")
        print(f"wrote {path}")
        del w_gate_up, w_down
    return 0


def _time_default(inputs, num_tokens, E, H, F, k, dtype):
    from triton.testing import do_bench

    config = launch_config.default_config(num_tokens, E, H, F, k, dtype)
    return do_bench(lambda: fused_pool_moe(*inputs, config), warmup=5, rep=25, return_mode="median")


if __name__ == "__main__":
    sys.exit(main())
