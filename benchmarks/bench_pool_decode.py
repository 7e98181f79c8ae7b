"""Decode step of a pool-MoE stack in one CUDA graph, against sum over layers of u_l x expert bytes.

L layers share one resident pool (M experts of width F). Each layer, on the same T
tokens: router GEMV (fp32 router weights, as in every checkpoint) -> routing
(NormRouter through the steering seam, tables all zero) -> pool MoE -> residual add.
Every layer has its own random router and routes its own hidden state, so u_l (the
distinct experts layer l touches) comes from real per-layer routing; it is counted
from the ids the replayed graph wrote. Attention, norms and the LM head are left
out: this measures what the pool costs a decode step (docs/field-notes.md 7-9).

Implementations, each captured whole (all L layers) in one graph, side by side:
  fused       fused_route + fused_pool_moe (Triton)
  baseline    fused_route + fused_pool_moe of another kernels/ copy (--baseline DIR)
  grouped-mm  route_with_table (torch) + torch._grouped_mm
  reference   route_with_table + pool_moe, eager only (it syncs): the correctness reference

bound = sum_l u_l x expert bytes / measured copy bandwidth (expert weights only, the
floor the pool sets); bound_all adds router weights and activations. Times are
do_bench medians of graph.replay() (L2 flushed per rep); fused eager beside them.

    python benchmarks/bench_pool_decode.py [--baseline DIR] [--tokens 1 8 64] [--layers 24]
    python benchmarks/bench_pool_decode.py --smoke --out /tmp/d.json   # CPU interpreter, tiny
Needs torch and triton only (no vLLM). Writes docs/results/pool-decode-<GPU>.json.
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

SHAPE_469M = (1024, 4096, 192, 1, 24)  # H, F, M, k, L: the paper's 469M UniPool model
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
SMOKE_SHAPE, SMOKE_TOKENS = (32, 48, 8, 2, 3), [1, 3]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1, eager only")
    p.add_argument("--shape", help="H,F,M,k,L (default the 469M shape 1024,4096,192,1,24)")
    p.add_argument("--tokens", type=int, nargs="+", help="decode batch sizes")
    p.add_argument("--baseline", type=Path, help="another kernels/ folder, timed as 'baseline'")
    p.add_argument("--out", type=Path, help="JSON path (default docs/results/pool-decode-<device>.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=int, help="experts each token keeps (an expert budget k' < k; default all k)")
    return p.parse_args(argv)


class PoolStack:
    """L routers over one resident pool; step(route, moe) runs all layers on self.hidden."""

    def __init__(self, torch, kernels, shape, num_tokens, dtype, device, gen, budget=None):
        H, F, M, k, L = shape
        self.torch, self.num_layers = torch, L
        self.spec = kernels.RoutingSpec.of("norm", k)
        self.w_gate_up = (torch.randn(M, 2 * F, H, generator=gen, device=device) / H**0.5).to(dtype)  # [M, 2F, H]
        self.w_down = (torch.randn(M, H, F, generator=gen, device=device) / F**0.5).to(dtype)  # [M, H, F]
        self.routers = torch.randn(L, M, H, generator=gen, device=device) / H**0.5  # [L, M, H] fp32
        self.norm_scales = 1.0 + torch.rand(L, 1, generator=gen, device=device)  # learned sigma_r, on device
        # Through the steering seam, as served: row 0 of the tables (all zeros) for every token.
        self.steering = kernels.SteeringView(
            torch.zeros(num_tokens, dtype=torch.int32, device=device),  # index [T]
            torch.zeros(1, L, M, device=device),  # bias [P+1, L, M]
            torch.zeros(1, L, M, dtype=torch.int8, device=device),  # mask [P+1, L, M]
            # --budget k': every token keeps k' of its k experts, the others are dropped (id M)
            None if budget is None else torch.full((num_tokens,), budget, dtype=torch.int32, device=device))
        self.hidden = torch.randn(num_tokens, H, generator=gen, device=device).to(dtype)  # [T, H], static input

    def step(self, route, moe):
        """(hidden after L layers [T, H], ids of every layer [L, T, k])."""
        torch = self.torch
        x, all_ids = self.hidden, []
        for layer in range(self.num_layers):
            logits = torch.nn.functional.linear(x.float(), self.routers[layer])  # [T, M] fp32
            ids, weights = route(logits, self.steering, layer, self.spec, self.norm_scales[layer])
            x = x + moe(x, self.w_gate_up, self.w_down, ids, weights)
            all_ids.append(ids.to(torch.int32))
        return x, torch.stack(all_ids)

    def expert_bytes(self):
        return (self.w_gate_up[0].numel() + self.w_down[0].numel()) * self.w_gate_up.element_size()

    def other_bytes(self):
        """Router weights read per step, plus activations in and out of every layer."""
        acts = 2 * self.num_layers * self.hidden.numel() * self.hidden.element_size()
        return self.routers.numel() * self.routers.element_size() + acts


def measure(torch, stack, name, route, moe, reference, timer, use_graph, bandwidth):
    want_x, want_ids = reference
    cell = {}
    try:
        if use_graph:
            graph, (x, ids) = capture_graph(torch, lambda: stack.step(route, moe))
            x.fill_(float("nan"))
            ids.fill_(-1)
            graph.replay()  # the replay must rewrite every output
            cell["graph_ms"] = graph_replay_ms(graph)
        else:
            x, ids = stack.step(route, moe)
        if name == "fused" or not use_graph:
            cell["eager_ms"] = timer(lambda: stack.step(route, moe))
    except Exception as exc:  # e.g. _grouped_mm unsupported, or capture refused
        return dict(error=f"{type(exc).__name__}: {str(exc)[:160]}")
    num_experts = stack.w_gate_up.shape[0]
    u = [int(torch.unique(ids[layer][ids[layer] < num_experts]).numel()) for layer in range(stack.num_layers)]
    cell.update(u_per_layer=u, u_sum=sum(u), max_abs_err=(x.float() - want_x.float()).abs().max().item(),
                routing_agreement=(ids == want_ids).float().mean().item())
    cell["bound_ms"] = sum(u) * stack.expert_bytes() / bandwidth * 1e3
    cell["bound_all_ms"] = cell["bound_ms"] + stack.other_bytes() / bandwidth * 1e3
    ms = cell.get("graph_ms", cell.get("eager_ms"))
    cell["fraction_of_bound"] = cell["bound_ms"] / ms
    if use_graph:
        del graph
    return cell


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import
    import torch

    kernels = import_kernels(REPO)
    routing = importlib.import_module(f"{kernels.__name__}.routing")
    fused_moe = importlib.import_module(f"{kernels.__name__}.fused_moe")
    device_name = importlib.import_module(f"{kernels.__name__}.launch_config").current_device_name()
    if not args.smoke and not torch.cuda.is_available():
        print("bench_pool_decode: needs a CUDA device (or --smoke)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16  # the interpreter has no bf16
    use_graph = device.type == "cuda"
    shape = tuple(int(v) for v in args.shape.split(",")) if args.shape else (SMOKE_SHAPE if args.smoke else SHAPE_469M)
    tokens = args.tokens or (SMOKE_TOKENS if args.smoke else TOKENS)
    timer = eager_timer(args.smoke)
    _, bandwidth = measure_machine(torch, timer, device, dtype, args.smoke)
    H, F, M, k, L = shape
    print(f"device {device_name}: copy {bandwidth / 1e9:.0f} GB/s; H={H} F={F} M={M} k={k} L={L} {dtype}")

    impls = {"fused": (routing.fused_route, fused_moe.fused_pool_moe)}
    if args.baseline:
        impls["baseline"] = (routing.fused_route, load_baseline(args.baseline))
    if device.type == "cuda" and hasattr(torch, "_grouped_mm"):
        impls["grouped-mm"] = (kernels.route_with_table, lambda *a: grouped_mm_moe(torch, *a))
    rows = []
    print(f"{'T':>5} {'u_l mean':>8} {'bound ms':>9} | " + " | ".join(f"{n:>24}" for n in impls)
          + " | fused eager ms | ratios to fused")
    for num_tokens in tokens:
        gen = torch.Generator(device=device).manual_seed(args.seed)  # same model and inputs for every T
        stack = PoolStack(torch, kernels, shape, num_tokens, dtype, device, gen, args.budget)
        reference = stack.step(kernels.route_with_table, kernels.pool_moe)
        row = dict(T=num_tokens, u_uniform=M * (1 - (1 - k / M) ** num_tokens), impls={})
        for name, (route, moe) in impls.items():
            row["impls"][name] = measure(torch, stack, name, route, moe, reference, timer, use_graph, bandwidth)
        mode = "graph_ms" if use_graph else "eager_ms"
        fused = row["impls"]["fused"]
        row["ratios"] = {f"{n}/fused": c[mode] / fused[mode] for n, c in row["impls"].items()
                         if n != "fused" and mode in c and mode in fused}
        rows.append(row)
        del stack, reference
        cells = []
        for name in impls:
            c = row["impls"][name]
            cells.append("error" if "error" in c else
                         f"{c.get('graph_ms', c.get('eager_ms')):.4f} ms {100 * c['fraction_of_bound']:5.1f}%")
        u_mean = fused.get("u_sum", 0) / L
        print(f"{num_tokens:>5} {u_mean:>8.1f} {fused.get('bound_ms', float('nan')):>9.4f} | "
              + " | ".join(f"{c:>24}" for c in cells) + f" | {fused.get('eager_ms', float('nan')):>14.3f} | "
              + ", ".join(f"{n.split('/')[0]} {v:.2f}x" for n, v in row["ratios"].items()), flush=True)

    data = dict(device=device_name, date=datetime.datetime.now(datetime.timezone.utc).isoformat(), smoke=args.smoke,
                dtype=str(dtype).removeprefix("torch."), torch=torch.__version__,
                triton=__import__("triton").__version__, graph_replay=use_graph, copy_bytes_per_s=bandwidth,
                shape=dict(H=H, F=F, M=M, k=k, L=L), baseline=str(args.baseline) if args.baseline else None,
                results=rows)
    out = args.out or REPO / "docs" / "results" / f"pool-decode-{device_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
