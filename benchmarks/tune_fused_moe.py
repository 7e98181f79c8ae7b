"""Sweep launch configs of the fused pool MoE on a CUDA GPU and write tuned JSON files.

For every shape (H, F, E, k) and token count T it times each candidate
MoELaunchConfig as the replay of a CUDA graph holding one fused_pool_moe call
(do_bench median, L2 flushed; eager timings at small T measure the host, not the
kernels), checks the winner against the torch reference, and writes
kernels/configs/E=..,H=..,F=..,k=..,dtype=..,device=<this GPU>.json
keyed by T, which kernels/launch_config.py then picks up.

Candidates: at small T (the down GEMM would have fewer than 2 programs per SM with
the default tiles) narrow column tiles and SPLIT_K 1..16 on the down GEMM; above
that, BLOCK_M near the rows each touched expert gets, SPLIT_K 1. Tiles that do not
fit the GPU's shared memory are skipped.

    python benchmarks/tune_fused_moe.py                         # the bench shapes, bf16
    python benchmarks/tune_fused_moe.py --shape 1024,4096,192,1 --tokens 1 8 64 --quick --out-dir /tmp/cfg
Needs torch and triton only (no vLLM). Each new config compiles once per kernel,
so a full sweep of one shape takes tens of minutes; --quick keeps a few per T.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # sibling modules, also when loaded by path

from gpu_timing import capture_graph, graph_replay_ms  # noqa: E402
from kernel_imports import import_kernels  # noqa: E402

SHAPES = ["1024,4096,192,1", "768,3072,96,1", "768,768,384,4", "2048,768,128,8"]  # H,F,E,k
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
TOLERANCE = 5e-2  # bf16 output vs the fp32-accumulating reference, O(1) activations

_kernels = import_kernels(REPO)
launch_config = importlib.import_module(f"{_kernels.__name__}.launch_config")
fused_pool_moe = importlib.import_module(f"{_kernels.__name__}.fused_moe").fused_pool_moe
pool_moe = _kernels.pool_moe
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


def candidates(num_tokens, num_experts, hidden, ffn, top_k, elt, quick, num_sms):
    """Configs worth timing at this T, each fitting in shared memory."""
    if launch_config.takes_small_t_path(num_tokens, num_experts, hidden, top_k, num_sms):
        block_ms = (16,)
        space = dict(
            BLOCK_N=(32, 64) if quick else (16, 32, 64),
            BLOCK_K=(64, 128) if quick else (64, 128, 256),
            GROUP_M=(1,),
            num_warps=(4,) if quick else (2, 4, 8),
            num_stages=(3, 4) if quick else (2, 3, 4, 5),
            SPLIT_K=(1, 2, 4, 8, 16),
        )
    else:
        slots = num_tokens * top_k
        rows = -(-slots // max(1, min(num_experts, slots)))  # expected rows per touched expert
        fit_m = max(16, 1 << (rows - 1).bit_length())
        block_ms = tuple(sorted({m for m in (16, 32, 64, 128) if m <= max(16, 2 * fit_m)}))
        space = dict(
            BLOCK_N=(64, 128) if quick else (32, 64, 128, 256),
            BLOCK_K=(64,) if quick else (32, 64, 128, 256),
            GROUP_M=(8,) if quick else (1, 8, 16),
            num_warps=(4, 8),
            num_stages=(3, 4) if quick else (2, 3, 4, 5),
            SPLIT_K=(1,),
        )
    limit = shared_memory_limit()
    for bm, bn, bk, group, warps, stages, split_k in itertools.product(block_ms, *space.values()):
        # gate_up keeps an A tile and two B tiles (gate, up) per pipeline stage.
        if (bm * bk + 2 * bk * bn) * elt * stages > limit:
            continue
        # Each K range of the down GEMM keeps at least two BLOCK_K steps.
        if split_k > 1 and ffn < split_k * 2 * bk:
            continue
        yield MoELaunchConfig(bm, bn, bk, group, warps, stages, SPLIT_K=split_k)


def routing(num_tokens, num_experts, top_k, gen):
    """Uniform routing with distinct experts per token (the untrained-router worst case for bytes)."""
    scores = torch.rand(num_tokens, num_experts, generator=gen, device="cuda")
    topk_ids = scores.topk(top_k, dim=-1).indices.to(torch.int32)  # [T, k]
    return topk_ids, torch.rand(num_tokens, top_k, generator=gen, device="cuda")


def replay_ms(inputs, config, rep_ms=25):
    graph, _ = capture_graph(torch, lambda: fused_pool_moe(*inputs, config))
    ms = graph_replay_ms(graph, warmup_ms=5, rep_ms=rep_ms)
    del graph
    return ms


def tune_point(inputs, shape, quick, num_sms):
    H, F, E, k = shape
    hidden = inputs[0]
    best = None
    for config in candidates(hidden.shape[0], E, H, F, k, hidden.element_size(), quick, num_sms):
        try:
            ms = replay_ms(inputs, config)
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
    num_sms = launch_config.current_num_sms()
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
            ms, config = tune_point(inputs, (H, F, E, k), args.quick, num_sms)
            err = (fused_pool_moe(*inputs, config).float() - pool_moe(*inputs).float()).abs().max().item()
            if err > TOLERANCE:
                raise RuntimeError(f"T={num_tokens}: best config {config} is wrong (max abs err {err:.3g})")
            default = launch_config.default_config(num_tokens, E, H, F, k, dtype, num_sms)
            default_ms = replay_ms(inputs, default)
            print(f"H={H} F={F} E={E} k={k} T={num_tokens:>5}: {ms:.4f} ms, default {default_ms:.4f} ms "
                  f"({default_ms / ms:.2f}x) {config}", flush=True)
            tuned[str(num_tokens)] = config.to_json()
        path = args.out_dir / launch_config.config_file_name(E, H, F, k, dtype, device_name)
        path.write_text(json.dumps(tuned, indent=1) + "\n")
        print(f"wrote {path}")
        del w_gate_up, w_down
    return 0


if __name__ == "__main__":
    sys.exit(main())
