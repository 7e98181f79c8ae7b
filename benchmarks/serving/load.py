"""Load generators: vLLM's own serving benchmark client, and a small client for steering.

Both drive `/v1/completions` with streaming, random prompts from a fixed seed, fixed
input and output lengths (`ignore_eos`), greedy sampling, at a fixed concurrency, and
report the same numbers: output tokens/s, TTFT and inter-token latency p50/p99.
vLLM's client cannot put a different top-level `steering` field on each request
(its `--extra-body` is the same for all), hence `steering_load`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

SUMMARY_KEYS = ("output_throughput", "request_throughput", "completed", "total_output_tokens", "duration",
                "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms", "median_tpot_ms", "p99_tpot_ms")


@dataclass(frozen=True)
class Workload:
    input_len: int
    output_len: int
    seed: int = 0

    def num_prompts(self, concurrency: int, waves: int, minimum: int = 8) -> int:
        return max(minimum, waves * concurrency)


def _bench_parser():
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from unipool_serve.model_executor.plugin import register_config

    register_config()  # the client loads the tokenizer (and its config) from the model folder
    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    return parser


def vllm_bench(base_url: str, model_name: str, model_dir: Path, workload: Workload, concurrency: int, num_prompts: int,
               result_dir: Path, label: str, log_dir: Path) -> dict:
    """One `vllm bench serve` run (random dataset), called through its Python module.

    The CPU build's `vllm` console script is broken, so the same parser and `main`
    are called in this process (its output goes to `client-<label>.log`).
    """
    from vllm.benchmarks.serve import main_async

    result_dir.mkdir(parents=True, exist_ok=True)
    filename = f"{label}.json"
    argv = [
        "--backend", "vllm", "--base-url", base_url, "--model", model_name,
        "--tokenizer", str(model_dir),
        "--dataset-name", "random", "--random-input-len", str(workload.input_len),
        "--random-output-len", str(workload.output_len), "--random-range-ratio", "0",
        "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--seed", str(workload.seed),
        "--temperature", "0", "--ignore-eos", "--num-warmups", str(min(concurrency, 4)),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--disable-tqdm", "--save-result", "--result-dir", str(result_dir), "--result-filename", filename,
    ]
    args = _bench_parser().parse_args(argv)
    log = Path(log_dir) / f"client-{label}.log"
    with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        raw = asyncio.run(main_async(args))
    gc.unfreeze()  # the client freezes the GC heap for its run
    if not raw.get("completed") or raw.get("failed"):
        raise RuntimeError(f"vllm bench serve: {raw.get('failed')} of {num_prompts} requests failed; log {log}:\n"
                           + "\n".join([str(e) for e in (raw.get("errors") or []) if e][:5]))
    return {k: raw.get(k) for k in SUMMARY_KEYS}


def random_prompts(vocab: int, count: int, length: int, seed: int, low: int = 3) -> list[list[int]]:
    """Token-id prompts (ids below `low` are the special tokens and are avoided)."""
    rng = random.Random(seed)
    return [[rng.randrange(low, vocab) for _ in range(length)] for _ in range(count)]


async def _one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, list[float], int]:
    start = time.perf_counter()
    times: list[float] = []
    tokens = 0
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{resp.status_code}: {(await resp.aread()).decode()[:500]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                times.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    ttft = times[0] - start if times else float("nan")
    # A chunk may carry several tokens when the server coalesces outputs; ITL is per chunk, like vLLM's client.
    return ttft, list(np.diff(times)), tokens


async def _steering_load(base_url, model, prompts, output_len, concurrency, profiles):
    url = base_url + "/v1/completions"
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def run(i, prompt):
            body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0,
                    "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            if profiles[i]:
                body["steering"] = profiles[i]
            async with sem:
                return await _one(client, url, body)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(run(i, p) for i, p in enumerate(prompts)))
        duration = time.perf_counter() - t0
    ttfts = [r[0] for r in results]
    itls = [x for r in results for x in r[1]]
    out_tokens = sum(r[2] for r in results)
    return {
        "output_throughput": out_tokens / duration, "completed": len(results), "total_output_tokens": out_tokens,
        "duration": duration, "median_ttft_ms": float(np.median(ttfts) * 1e3),
        "p99_ttft_ms": float(np.percentile(ttfts, 99) * 1e3), "median_itl_ms": float(np.median(itls) * 1e3),
        "p99_itl_ms": float(np.percentile(itls, 99) * 1e3),
    }


def steering_load(base_url: str, model: str, prompts: list[list[int]], output_len: int, concurrency: int,
                  profiles: list[str | None]) -> dict:
    """Same prompts, same concurrency; `profiles[i]` is request i's profile (None = unsteered)."""
    return asyncio.run(_steering_load(base_url, model, prompts, output_len, concurrency, profiles))


def steering_assignment(count: int, names: list[str], share: float = 0.5, seed: int = 0) -> list[str | None]:
    """Half the requests steered, round-robin over the profiles, in a shuffled order."""
    steered = int(round(count * share))
    rows = [names[i % len(names)] for i in range(steered)] + [None] * (count - steered)
    random.Random(seed).shuffle(rows)
    return rows
