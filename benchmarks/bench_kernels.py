"""Pool-MoE kernels side by side, each point as a fraction of its roofline.

Implementations, all on the same inputs in one run:
  fused      kernels/fused_moe.fused_pool_moe (Triton, align + 2 grouped GEMMs + combine)
  torch-loop kernels/moe_reference.pool_moe (one F.linear pair per touched expert)
  grouped-mm torch._grouped_mm (sorted slots, 2 grouped GEMMs; CUDA only, where available)

Roofline per point: bound = max(FLOPs / peak, bytes / bandwidth), with the bf16
matmul peak and HBM bandwidth measured in this run; FLOPs = 6 * T * k * H * F;
bytes = distinct experts touched * expert bytes + activations in and out
(docs/field-notes.md section 7: a shared pool's cost is the experts it touches).
Times are CUDA-event medians from triton.testing.do_bench (L2 flushed per rep).

    python benchmarks/bench_kernels.py                 # GPU, bf16, writes docs/results/
    python benchmarks/bench_kernels.py --smoke --out /tmp/k.json   # CPU, interpreter, tiny
Needs torch and triton only (no vLLM).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(1024, 4096, 192, 1), (768, 3072, 96, 1), (768, 768, 384, 4)]  # (H, F, M experts, k)
TOKENS = [1, 8, 32, 128, 512, 4096, 16384]
SMOKE_SHAPES, SMOKE_TOKENS = [(32, 48, 8, 2)], [1, 5]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    p.add_argument("--out", type=Path, help="JSON path (default docs/results/kernels-<device>.json)")
    p.add_argument("--tokens", type=int, nargs="+", help="override the token counts")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def import_kernels():
    """The installed package if present, else the repository's kernels/ folder."""
    try:
        from unipool_serve import kernels
        from unipool_serve.kernels import fused_moe, launch_config
    except ImportError:
        sys.path.insert(0, str(REPO))
        import kernels
        from kernels import fused_moe, launch_config
    return kernels.pool_moe, fused_moe.fused_pool_moe, launch_config.current_device_name


def make_timer(smoke: bool):
    if not smoke:
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")  # ms

    def wall_median(fn, reps=3):  # the interpreter has no CUDA events
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return wall_median


def measure_machine(torch, timer, device, dtype, smoke):
    """(matmul FLOP/s, memory bytes/s) measured on this device."""
    n = 256 if smoke else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    peak = 2 * n**3 / (timer(lambda: a @ b) * 1e-3)
    numel = (1 << 20) if smoke else (1 << 30)  # 2 GiB of bf16 on the GPU
    src = torch.empty(numel, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * src.element_size() / (timer(lambda: dst.copy_(src)) * 1e-3)  # read + write
    return peak, bandwidth


def grouped_mm_moe(torch, hidden, w_gate_up, w_down, topk_ids, topk_weights):
    """Pool MoE through torch._grouped_mm: slots sorted by expert, one grouped GEMM per projection."""
    num_tokens, top_k = topk_ids.shape
    flat = topk_ids.reshape(-1).long()  # [S]
    order = torch.argsort(flat, stable=True)  # [S]
    counts = torch.zeros(w_gate_up.shape[0], dtype=torch.int64, device=hidden.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    offs = torch.cumsum(counts, 0).to(torch.int32)  # [E] group ends
    x = hidden[order // top_k]  # [S, H]
    gate_up = torch._grouped_mm(x, w_gate_up.transpose(1, 2), offs=offs)  # [S, 2F]
    gate, up = gate_up.chunk(2, dim=-1)
    y = torch._grouped_mm(torch.nn.functional.silu(gate) * up, w_down.transpose(1, 2), offs=offs)  # [S, H]
    y = y.float() * topk_weights.reshape(-1)[order].unsqueeze(1)
    out = torch.zeros(num_tokens, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    out.index_add_(0, order // top_k, y)
    return out.to(hidden.dtype)


def bench_point(torch, impls, timer, shape, num_tokens, pools, machine, dtype, device, gen):
    H, F, M, k = shape
    w_gate_up, w_down = pools
    hidden = torch.randn(num_tokens, H, generator=gen, device=device).to(dtype)
    # Uniform routing with k distinct experts per token, as an untrained router would give.
    topk_ids = torch.rand(num_tokens, M, generator=gen, device=device).topk(k, dim=-1).indices.to(torch.int32)
    topk_weights = torch.rand(num_tokens, k, generator=gen, device=device)
    touched = int(torch.unique(topk_ids).numel())
    elt = hidden.element_size()
    flops = 6 * num_tokens * k * H * F
    bytes_moved = touched * 3 * H * F * elt + 2 * num_tokens * H * elt
    peak, bandwidth = machine
    bound_ms = max(flops / peak, bytes_moved / bandwidth) * 1e3
    row = dict(H=H, F=F, M=M, k=k, T=num_tokens, touched=touched, flops=flops, bytes=bytes_moved,
               bound_ms=bound_ms, impls={})
    want = impls["torch-loop"](hidden, w_gate_up, w_down, topk_ids, topk_weights).float()
    for name, fn in impls.items():
        args = (hidden, w_gate_up, w_down, topk_ids, topk_weights)
        try:
            err = (fn(*args).float() - want).abs().max().item()  # correctness right after the launch
            ms = timer(lambda: fn(*args))
        except Exception as exc:  # e.g. _grouped_mm unsupported on this GPU or build
            row["impls"][name] = dict(error=f"{type(exc).__name__}: {str(exc)[:160]}")
            continue
        row["impls"][name] = dict(ms=ms, fraction_of_roofline=bound_ms / ms, max_abs_err=err)
    return row


def print_table(rows, names):
    head = f"{'H':>5} {'F':>5} {'M':>4} {'k':>2} {'T':>6} {'touched':>7} {'bound ms':>9}"
    print(head + "".join(f" | {n:>22}" for n in names))
    for r in rows:
        line = f"{r['H']:>5} {r['F']:>5} {r['M']:>4} {r['k']:>2} {r['T']:>6} {r['touched']:>7} {r['bound_ms']:>9.4f}"
        for n in names:
            cell = r["impls"].get(n, {})
            text = "n/a" if "ms" not in cell else f"{cell['ms']:.4f} ms {100 * cell['fraction_of_roofline']:5.1f}%"
            line += f" | {text:>22}"
        print(line)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import
    import torch

    pool_moe, fused_pool_moe, device_name = import_kernels()
    if not args.smoke and not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA device (or --smoke)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16  # the interpreter has no bf16
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    tokens = args.tokens or (SMOKE_TOKENS if args.smoke else TOKENS)
    timer = make_timer(args.smoke)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    impls = {"fused": fused_pool_moe, "torch-loop": pool_moe}
    if device.type == "cuda" and hasattr(torch, "_grouped_mm"):
        impls["grouped-mm"] = lambda *a: grouped_mm_moe(torch, *a)
    machine = measure_machine(torch, timer, device, dtype, args.smoke)
    print(f"device {device_name()}: matmul {machine[0] / 1e12:.1f} TFLOP/s, copy {machine[1] / 1e9:.0f} GB/s ({dtype})")

    rows = []
    for shape in shapes:
        H, F, M, _ = shape
        w_gate_up = (torch.randn(M, 2 * F, H, generator=gen, device=device) / H**0.5).to(dtype)  # [M, 2F, H]
        w_down = (torch.randn(M, H, F, generator=gen, device=device) / F**0.5).to(dtype)  # [M, H, F]
        for num_tokens in tokens:
            rows.append(bench_point(torch, impls, timer, shape, num_tokens, (w_gate_up, w_down),
                                    machine, dtype, device, gen))
        del w_gate_up, w_down
    print_table(rows, list(impls))

    result = dict(device=device_name(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  smoke=args.smoke, dtype=str(dtype).removeprefix("torch."), torch=torch.__version__,
                  triton=__import__("triton").__version__, matmul_flops_per_s=machine[0],
                  copy_bytes_per_s=machine[1], results=rows)
    out = args.out or REPO / "docs" / "results" / f"kernels-{device_name()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
