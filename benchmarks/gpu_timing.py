"""Timing for the kernel benchmarks: eager medians, CUDA-graph replay, the machine's ceilings.

Serving runs decode under CUDA graphs, where a launch costs a few microseconds of
GPU time and no host time; eager timing of a small-T call mostly measures the
host. So every GPU point is timed both ways, side by side.

- eager_timer(smoke): triton.testing.do_bench median (ms, L2 flushed per rep) on a
  GPU; a wall-clock median under --smoke (the interpreter has no CUDA events).
- capture_graph(torch, fn): fn() recorded in one CUDA graph, after two warm-up runs
  on a side stream (Triton compiles on first use; the allocator settles), and its
  static output, which each replay rewrites.
- graph_replay_ms(graph): do_bench median of graph.replay().
- measure_machine: bf16 matmul FLOP/s and device-copy bytes/s (read + write) measured now.
"""

from __future__ import annotations

import statistics
import time

REPS_MS = 100  # do_bench: time budget per point


def eager_timer(smoke: bool):
    if not smoke:
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=REPS_MS, return_mode="median")  # ms

    def wall_median(fn, reps=3):
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return wall_median


def capture_graph(torch, fn):
    """(torch.cuda.CUDAGraph holding fn(), fn's output tensor(s) from the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return graph, out


def graph_replay_ms(graph, warmup_ms: int = 25, rep_ms: int = REPS_MS) -> float:
    from triton.testing import do_bench

    return do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def measure_machine(torch, timer, device, dtype, smoke):
    """(matmul FLOP/s, copy bytes/s) measured on this device."""
    n = 256 if smoke else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    peak = 2 * n**3 / (timer(lambda: a @ b) * 1e-3)
    numel = (1 << 20) if smoke else (1 << 30)  # 2 GiB of bf16 on the GPU
    src = torch.empty(numel, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * src.element_size() / (timer(lambda: dst.copy_(src)) * 1e-3)  # read + write
    del a, b, src, dst
    return peak, bandwidth
