"""Runs the phases of a mode, one server at a time, and collects every measurement as plain data."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import time
from pathlib import Path

import psutil

from .load import steering_assignment, steering_load, vllm_bench
from .models import weight_bytes, write_all, write_profiles
from .plan import Mode, Phase, phases
from .server import Server, other_engines_running

KV_RE = re.compile(r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def wait_for_quiet(max_wait: float) -> int:
    """Wait (up to max_wait s) while other vLLM engines run on this machine; returns how many remain."""
    deadline = time.monotonic() + max_wait
    while (n := other_engines_running()) and time.monotonic() < deadline:
        log(f"{n} other vLLM process(es) running; waiting")
        time.sleep(15)
    return n


def machine_info() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    flags = next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), [])
    return {"cpu": cpu, "vcpus": os.cpu_count(), "avx512": any(f.startswith("avx512") for f in flags),
            "amx": any(f.startswith("amx") for f in flags), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version()}


def kv_from_log(text: str) -> dict:
    m = KV_RE.search(text)
    if not m:
        return {}
    return {"kv_tokens": int(m.group(1).replace(",", "")), "kv_max_concurrency": float(m.group(3)),
            "kv_max_concurrency_at_tokens": int(m.group(2).replace(",", ""))}


def unipool_metrics(text: str) -> dict:
    """Per-expert token counts from `unipool_expert_tokens_total` (cumulative since start)."""
    counts = {}
    for line in text.splitlines():
        if line.startswith("unipool_expert_tokens_total{"):
            labels, value = line.rsplit(" ", 1)
            expert = re.search(r'expert="(\d+)"', labels).group(1)
            pool = re.search(r'pool="(\d+)"', labels).group(1)
            counts[f"{pool}/{expert}"] = float(value)
    total = sum(counts.values()) or 1.0
    shares = sorted((v / total for v in counts.values()), reverse=True)
    return {"expert_tokens": counts, "max_share": shares[0] if shares else None,
            "experts_with_tokens": sum(1 for v in counts.values() if v > 0)}


class Harness:
    def __init__(self, mode: Mode, work_dir: Path, *, wait_quiet: float = 120):
        self.mode, self.work = mode, Path(work_dir)
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.wait_quiet = wait_quiet
        self.points: list[dict] = []
        self.servers: list[dict] = []

    # ---- setup -----------------------------------------------------------
    def prepare(self) -> dict:
        mode = self.mode
        log(f"writing benchmark models ({mode.shape})")
        which = ("unipool", "vanilla", "mixtral") if {"plugin", "pool", "budget", "http"} & set(mode.comparisons) \
            else ("unipool",)
        self.models = write_all(self.work / "models", mode.shape, which)
        self.steering_dir = self.work / "steering"
        self.profiles = write_profiles(self.models["unipool"], self.steering_dir)
        self.weights = {k: weight_bytes(p, mode.shape.dtype) for k, p in self.models.items()}
        per_token = mode.shape.kv_bytes_per_token()
        seq_tokens = math.ceil((mode.workload.input_len + mode.workload.output_len) / 128) * 128
        base, base_kv = mode.budget_baseline, mode.budget_kv_seqs * seq_tokens * per_token
        self.budget = {"kv_bytes_per_token": per_token, "baseline": base, "baseline_kv_bytes": base_kv}
        if base in self.weights:
            total = self.weights[base]["total"] + base_kv
            self.budget.update(total_bytes=total, kv={base: base_kv, "unipool": total - self.weights["unipool"]["total"]})
        return {"models": {k: str(v) for k, v in self.models.items()}, "weights": self.weights,
                "budget": self.budget, "profiles": self.profiles}

    # ---- one phase -------------------------------------------------------
    def _bench(self, server: Server, phase: Phase, repeat: int, kind: str, concurrency: int) -> dict:
        mode = self.mode
        label = f"{phase.spec.name}-{kind}-c{concurrency}-r{repeat}"
        n = mode.workload.num_prompts(concurrency, mode.waves)
        server.sampler.mark()
        summary = vllm_bench(server.base_url, phase.spec.served_name, phase.spec.model, mode.workload, concurrency, n,
                             self.work / "raw", label, self.logs)
        point = {"server": phase.spec.name, "model": phase.model_key, "repeat": repeat, "kind": kind,
                 "client": "vllm bench serve", "concurrency": concurrency, "num_prompts": n,
                 "rss_peak_bytes": server.sampler.peak_since_mark, "load_average_after": os.getloadavg()[0],
                 "other_vllm_processes_after": other_engines_running(), **summary}
        log(f"  {label}: {summary['output_throughput']:.1f} tok/s, TTFT p50 {summary['median_ttft_ms']:.0f} ms, "
            f"ITL p50 {summary['median_itl_ms']:.1f} ms")
        self.points.append(point)
        return point

    def _steering(self, server: Server, phase: Phase, repeat: int) -> None:
        from .load import random_prompts

        mode, c = self.mode, self.mode.compare_at
        n = mode.workload.num_prompts(c, mode.waves)
        prompts = random_prompts(min(mode.shape.vocab, 320), n, mode.workload.input_len, mode.workload.seed)
        order = ("off", "on") if repeat % 2 == 0 else ("on", "off")  # alternate which goes first
        for state in order:
            profiles = steering_assignment(n, self.profiles) if state == "on" else [None] * n
            server.sampler.mark()
            summary = steering_load(server.base_url, phase.spec.served_name, prompts, mode.workload.output_len, c, profiles)
            self.points.append({"server": phase.spec.name, "model": phase.model_key, "repeat": repeat,
                                "kind": f"steering-{state}", "client": "steering client", "concurrency": c,
                                "num_prompts": n, "steered": sum(p is not None for p in profiles),
                                "rss_peak_bytes": server.sampler.peak_since_mark,
                                "load_average_after": os.getloadavg()[0],
                                "other_vllm_processes_after": other_engines_running(), **summary})
            log(f"  steering {state}: {summary['output_throughput']:.1f} tok/s, ITL p50 {summary['median_itl_ms']:.1f} ms")

    def run_phase(self, phase: Phase, repeat: int) -> None:
        mode = self.mode
        others = wait_for_quiet(self.wait_quiet)
        log(f"starting {phase.spec.name} (repeat {repeat}); other vLLM processes: {others}")
        record = {"server": phase.spec.name, "kind": phase.spec.kind, "model": phase.model_key, "repeat": repeat,
                  "engine_args": phase.spec.engine_args, "env": phase.spec.env, "other_vllm_processes": others,
                  "load_average_before": os.getloadavg()}
        with Server(phase.spec, self.logs / f"r{repeat}") as server:
            record.update(start_seconds=server.start_seconds, rss_ready_bytes=server.sampler.last,
                          **kv_from_log(server.log_path.read_text(errors="replace")))
            log(f"  ready in {server.start_seconds:.0f} s, RSS {server.sampler.last / 2**20:.0f} MiB, "
                f"KV {record.get('kv_tokens')} tokens")
            if phase.sweep:
                for c in mode.concurrencies:
                    self._bench(server, phase, repeat, "sweep", c)
            if phase.compare and not (phase.sweep and mode.compare_at in mode.concurrencies):
                self._bench(server, phase, repeat, "compare", mode.compare_at)
            if phase.steering:
                self._steering(server, phase, repeat)
            if phase.budget:
                self._bench(server, phase, repeat, "budget", mode.budget_at)
            if phase.spec.kind == "unipool-serve":
                try:
                    record["pool_metrics"] = unipool_metrics(server.metrics_text())
                except Exception as exc:  # metrics are a by-product here, not the measurement
                    record["pool_metrics"] = {"error": str(exc)}
            record["rss_peak_bytes"] = server.sampler.peak
        record["load_average_after"] = os.getloadavg()
        self.servers.append(record)

    def run(self, run_phases: list[Phase]) -> None:
        for repeat in range(self.mode.repeats):
            for phase in run_phases:
                self.run_phase(phase, repeat)

    def phases(self) -> list[Phase]:
        return phases(self.mode, self.models, self.steering_dir, self.budget.get("kv", {}))


def dump(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))
