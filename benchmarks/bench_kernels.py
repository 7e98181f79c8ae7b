"""Pool-MoE kernels side by side, eager and under CUDA-graph replay, as fractions of the roofline.

Implementations, all on the same inputs in one run:
  fused      kernels/fused_moe.fused_pool_moe (Triton: one-launch align, 2 grouped GEMMs, combine)
  baseline   fused_pool_moe from another kernels/ copy (--baseline DIR, e.g. main's): today's kernel
  grouped-mm torch._grouped_mm (sorted slots, 2 grouped GEMMs; CUDA only, where available)
  torch-loop kernels/moe_reference.pool_moe (one F.linear pair per touched expert; eager only:
             it reads counts back to the host, so it cannot be captured)
and the align stage alone: align-triton (fused_align) and align-torch (moe_align, its reference).

Roofline per point: bound = max(FLOPs / peak, bytes / bandwidth), with the bf16
matmul peak and the copy bandwidth measured in this run; FLOPs = 6 * T * k * H * F;
bytes = distinct experts touched x expert bytes + activations in and out
(docs/field-notes.md section 7: a shared pool's cost is the experts it touches).
Times are do_bench medians (L2 flushed per rep), eager and as graph.replay() of a
CUDA graph holding one call (how vLLM runs decode). Every implementation's output,
eager and replayed, is checked against the torch reference at every point.

    python benchmarks/bench_kernels.py [--baseline /path/to/main/kernels]   # GPU, bf16
    python benchmarks/bench_kernels.py --smoke --out /tmp/k.json   # CPU, interpreter, tiny, eager only
Needs torch and triton only (no vLLM).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # sibling modules, also when loaded by path

from gpu_timing import capture_graph, eager_timer, graph_replay_ms, measure_machine  # noqa: E402
from grouped_mm_baseline import grouped_mm_moe  # noqa: E402
from kernel_imports import import_kernels, load_baseline  # noqa: E402

# (H, F, M experts, k): the 469M UniPool shape, two more pools, a wide top-8 one.
SHAPES = [(1024, 4096, 192, 1), (768, 3072, 96, 1), (768, 768, 384, 4), (2048, 768, 128, 8)]
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 4096, 16384]
SMOKE_SHAPES, SMOKE_TOKENS = [(32, 48, 8, 2)], [1, 5]
UNCAPTURABLE = {"torch-loop"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1, eager only")
    p.add_argument("--out", type=Path, help="JSON path (default docs/results/kernels-<device>.json)")
    p.add_argument("--tokens", type=int, nargs="+", help="override the token counts")
    p.add_argument("--shape", action="append", help="H,F,M,k (repeatable); default: the four bench shapes")
    p.add_argument("--baseline", type=Path, help="another kernels/ folder, timed as 'baseline'")
    p.add_argument("--no-graph", action="store_true", help="eager timings only")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def time_impl(torch, fn, args, want, timer, use_graph):
    """{eager_ms, graph_ms, max_abs_err, graph_max_abs_err} or {error} for one implementation."""
    try:
        result = dict(max_abs_err=(fn(*args).float() - want).abs().max().item())  # checked right after the launch
        result["eager_ms"] = timer(lambda: fn(*args))
        if use_graph:
            graph, out = capture_graph(torch, lambda: fn(*args))
            out.fill_(float("nan"))  # the replay must rewrite every element
            graph.replay()
            result["graph_max_abs_err"] = (out.float() - want).abs().max().item()
            result["graph_ms"] = graph_replay_ms(graph)
            del graph, out
    except Exception as exc:  # e.g. _grouped_mm unsupported on this GPU or build
        return dict(error=f"{type(exc).__name__}: {str(exc)[:160]}")
    return result


def time_stage(torch, fn, timer, use_graph):
    result = dict(eager_ms=timer(fn))
    if use_graph:
        graph, _ = capture_graph(torch, fn)
        result["graph_ms"] = graph_replay_ms(graph)
        del graph
    return result


def bench_point(torch, kernels, impls, timer, shape, num_tokens, pools, machine, dtype, device, gen, use_graph):
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
    config = kernels.launch_config.get_config(num_tokens, M, H, F, k, dtype)
    row = dict(H=H, F=F, M=M, k=k, T=num_tokens, touched=touched, flops=flops, bytes=bytes_moved,
               bound_ms=bound_ms, config=config.to_json(), impls={}, stages={})
    args = (hidden, w_gate_up, w_down, topk_ids, topk_weights)
    want = kernels.pool_moe(*args).float()
    for name, fn in impls.items():
        cell = time_impl(torch, fn, args, want, timer, use_graph and name not in UNCAPTURABLE)
        for mode in ("eager", "graph"):
            if f"{mode}_ms" in cell:
                cell[f"{mode}_fraction_of_roofline"] = bound_ms / cell[f"{mode}_ms"]
        row["impls"][name] = cell
    aligns = {"align-triton": kernels.fused_align.fused_align_slots_by_expert,
              "align-torch": kernels.moe_align.align_slots_by_expert}
    for name, align in aligns.items():
        row["stages"][name] = time_stage(torch, lambda: align(topk_ids, M, config.BLOCK_M), timer, use_graph)
    mode = "graph_ms" if use_graph else "eager_ms"
    fused_ms = row["impls"]["fused"].get(mode)
    row["ratios"] = {f"{name}/fused ({mode[:-3]})": cell[mode] / fused_ms
                     for name, cell in row["impls"].items() if name != "fused" and mode in cell and fused_ms}
    return row


def print_table(rows, names, use_graph):
    mode = "graph" if use_graph else "eager"
    head = f"{'H':>5} {'F':>5} {'M':>4} {'k':>2} {'T':>6} {'touched':>7} {'bound ms':>9} {'SPLIT_K':>7}"
    cols = [f"{n} {mode if n not in UNCAPTURABLE else 'eager'}" for n in names]
    cols += (["fused eager"] if use_graph else []) + [f"align tri/torch us {mode}"]
    print("times in ms (fraction of roofline); graph = CUDA-graph replay of one call, eager = plain calls")
    print(head + "".join(f" | {c:>22}" for c in cols) + " | ratios to fused")
    for r in rows:
        line = (f"{r['H']:>5} {r['F']:>5} {r['M']:>4} {r['k']:>2} {r['T']:>6} {r['touched']:>7} "
                f"{r['bound_ms']:>9.4f} {r['config']['SPLIT_K']:>7}")
        for n in names:
            cell = r["impls"].get(n, {})
            m = "eager" if n in UNCAPTURABLE else mode
            ms = cell.get(f"{m}_ms")
            text = "n/a" if ms is None else f"{ms:.4f} {100 * cell[f'{m}_fraction_of_roofline']:5.1f}%"
            line += f" | {text:>22}"
        if use_graph:
            fused_eager = r["impls"]["fused"].get("eager_ms")
            line += f" | {'n/a' if fused_eager is None else f'{fused_eager:.4f}':>22}"
        stages = [r["stages"][s].get(f"{mode}_ms") for s in ("align-triton", "align-torch")]
        line += f" | {' / '.join('n/a' if s is None else f'{1e3 * s:.1f}' for s in stages):>22}"
        line += " | " + ", ".join(f"{name.split('/')[0]} {v:.2f}x" for name, v in r["ratios"].items())
        print(line)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import
    import torch

    kernels = import_kernels(REPO)
    for sub in ("fused_moe", "fused_align", "moe_align", "launch_config"):
        setattr(kernels, sub, importlib.import_module(f"{kernels.__name__}.{sub}"))
    if not args.smoke and not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA device (or --smoke)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16  # the interpreter has no bf16
    use_graph = device.type == "cuda" and not args.no_graph
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape else (
        SMOKE_SHAPES if args.smoke else SHAPES)
    tokens = args.tokens or (SMOKE_TOKENS if args.smoke else TOKENS)
    timer = eager_timer(args.smoke)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    device_name = kernels.launch_config.current_device_name()

    impls = {"fused": kernels.fused_moe.fused_pool_moe}
    if args.baseline:
        impls["baseline"] = load_baseline(args.baseline)
    if device.type == "cuda" and hasattr(torch, "_grouped_mm"):
        impls["grouped-mm"] = lambda *a: grouped_mm_moe(torch, *a)
    impls["torch-loop"] = kernels.pool_moe
    machine = measure_machine(torch, timer, device, dtype, args.smoke)
    print(f"device {device_name}: matmul {machine[0] / 1e12:.1f} TFLOP/s, copy {machine[1] / 1e9:.0f} GB/s ({dtype})")

    rows = []
    for shape in shapes:
        H, F, M, _ = shape
        w_gate_up = (torch.randn(M, 2 * F, H, generator=gen, device=device) / H**0.5).to(dtype)  # [M, 2F, H]
        w_down = (torch.randn(M, H, F, generator=gen, device=device) / F**0.5).to(dtype)  # [M, H, F]
        for num_tokens in tokens:
            rows.append(bench_point(torch, kernels, impls, timer, shape, num_tokens, (w_gate_up, w_down),
                                    machine, dtype, device, gen, use_graph))
            print(f"  done H={H} F={F} M={M} T={num_tokens}", file=sys.stderr, flush=True)
        del w_gate_up, w_down
    print_table(rows, list(impls), use_graph)

    result = dict(device=device_name, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  smoke=args.smoke, dtype=str(dtype).removeprefix("torch."), torch=torch.__version__,
                  triton=__import__("triton").__version__, graph_replay=use_graph,
                  baseline=str(args.baseline) if args.baseline else None, matmul_flops_per_s=machine[0],
                  copy_bytes_per_s=machine[1], results=rows)
    out = args.out or REPO / "docs" / "results" / f"kernels-{device_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
