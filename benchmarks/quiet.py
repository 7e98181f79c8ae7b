"""Is this machine quiet enough to measure on? Every CPU benchmark here asks before it starts.

Quiet means both:
  - the 1-minute load average is below MAX_LOAD_PER_CORE (0.5) x the CPUs this process may use
    (1.0 on a 2-vCPU machine): on 2 vCPUs one other busy process already halves what an engine
    gets, and the load average is what the earlier runs of these scripts recorded;
  - no other process used more than BUSY_PERCENT (25 %) of one CPU over a SAMPLE_S (2 s) sample
    (this process and its children are not counted).
The load average lags by about a minute, so a benchmark started right after another one (or
after an engine test) may be refused: wait, or pass `wait_s` (the scripts' --wait-quiet).

A benchmark calls `check(force)` first: when the machine is not quiet it prints one line and
exits with status 2, unless forced (--force-noisy), when it warns loudly and records
`noisy: true`. `after(state)` records the load when the benchmark ends. Both return plain dicts
for the benchmark's JSON, with the CPU model and the ISA flags vLLM's CPU kernels choose between
(AVX2, AVX-512 and its BF16/VNNI subsets, AMX).

  python benchmarks/quiet.py [--max-load-per-core 0.5] [--busy-percent 25]   # exit 0 if quiet, 2 if not
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import psutil

MAX_LOAD_PER_CORE = 0.5
BUSY_PERCENT = 25.0
SAMPLE_S = 2.0
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpus() -> int:
    """CPUs this process may run on (its affinity), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_info() -> dict:
    """CPU model, vCPUs, and which of ISA_FLAGS /proc/cpuinfo lists."""
    model, flags = "?", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "?":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu_model": model, "vcpus": os.cpu_count(), "cpus_allowed": sorted(os.sched_getaffinity(0)),
            "isa": {flag: flag in flags for flag in ISA_FLAGS},
            "avx512": any(f.startswith("avx512") for f in flags), "amx": any(f.startswith("amx") for f in flags)}


def _own_tree() -> set[int]:
    me = psutil.Process()
    pids = {me.pid}
    try:
        pids |= {c.pid for c in me.children(recursive=True)}
    except psutil.Error:
        pass
    return pids


def busy_processes(sample_s: float = SAMPLE_S, busy_percent: float = BUSY_PERCENT) -> list[dict]:
    """Other processes that used more than busy_percent of one CPU over sample_s seconds, busiest first."""
    own = _own_tree()
    procs = []
    for proc in psutil.process_iter(["pid", "name"]):
        if proc.pid in own:
            continue
        try:
            proc.cpu_percent(None)  # starts this process's sample
            procs.append(proc)
        except psutil.Error:
            pass
    time.sleep(sample_s)
    busy = []
    for proc in procs:
        try:
            percent = proc.cpu_percent(None)
            if percent > busy_percent:
                cmd = " ".join(proc.cmdline())[:160] or proc.info["name"]
                busy.append({"pid": proc.pid, "name": proc.info["name"], "cpu_percent": round(percent, 1),
                             "cmdline": cmd})
        except psutil.Error:
            pass
    return sorted(busy, key=lambda p: -p["cpu_percent"])


def state(max_load_per_core: float = MAX_LOAD_PER_CORE, busy_percent: float = BUSY_PERCENT,
          sample_s: float = SAMPLE_S) -> dict:
    """The machine now: load averages, busy processes, and whether that is quiet."""
    busy = busy_processes(sample_s, busy_percent)
    load = os.getloadavg()
    limit = max_load_per_core * cpus()
    return {"load_before": round(load[0], 2), "load_avg_1_5_15": [round(x, 2) for x in load],
            "load_limit": limit, "busy_percent_limit": busy_percent, "busy_processes": busy,
            "quiet": load[0] < limit and not busy, **cpu_info()}


def _reason(s: dict) -> str:
    parts = []
    if s["load_before"] >= s["load_limit"]:
        parts.append(f"1-min load {s['load_before']} >= {s['load_limit']:g} ({MAX_LOAD_PER_CORE:g} per core)")
    if s["busy_processes"]:
        parts.append("busy: " + ", ".join(f"{p['name']}({p['pid']}) {p['cpu_percent']}%" for p in s["busy_processes"][:4]))
    return "; ".join(parts) or "quiet"


def check(force: bool, *, wait_s: float = 0.0, max_load_per_core: float = MAX_LOAD_PER_CORE,
          busy_percent: float = BUSY_PERCENT) -> dict:
    """Refuse to measure on a busy machine (exit 2) unless forced; waits up to wait_s for it to calm down.

    Returns {load_before, load_avg_1_5_15, busy_processes, cpu model, ISA flags, quiet, noisy, ...}."""
    deadline = time.monotonic() + wait_s
    while True:
        s = state(max_load_per_core, busy_percent)
        if s["quiet"] or time.monotonic() >= deadline:
            break
        print(f"[quiet] waiting: {_reason(s)}", file=sys.stderr, flush=True)
        time.sleep(min(15.0, max(0.0, deadline - time.monotonic())))
    s["noisy"] = not s["quiet"]
    s["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if s["quiet"]:
        return s
    if not force:
        print(f"not quiet, not measuring: {_reason(s)} (pass --force-noisy to run anyway)", file=sys.stderr)
        sys.exit(2)
    bar = "!" * 78
    print(f"{bar}\n! NOISY MACHINE, forced: {_reason(s)}\n! these numbers are not measurements "
          f"(recorded as noisy: true)\n{bar}", file=sys.stderr, flush=True)
    return s


def after(before: dict | None = None, *, sample_s: float = SAMPLE_S) -> dict:
    """The load when a benchmark ends (and who else was busy then)."""
    limit = (before or {}).get("busy_percent_limit", BUSY_PERCENT)
    return {"load_after": round(os.getloadavg()[0], 2), "load_avg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
            "busy_processes_after": busy_processes(sample_s, limit), "ended_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def record(before: dict) -> dict:
    """The quiet fields of a benchmark's JSON: whether it was forced on a busy machine, and the machine
    at its start and its end."""
    return {"noisy": before["noisy"], "quiet_before": before, "quiet_after": after(before)}


def write_json(path: str, data: dict) -> None:
    """Write a benchmark's JSON (its folder created) and say where."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--force-noisy and --wait-quiet, the same in every benchmark script."""
    parser.add_argument("--force-noisy", action="store_true",
                        help="run on a busy machine anyway (warns; the JSON says noisy: true)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                        help="wait up to S seconds for the machine to become quiet before refusing")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-load-per-core", type=float, default=MAX_LOAD_PER_CORE)
    parser.add_argument("--busy-percent", type=float, default=BUSY_PERCENT)
    parser.add_argument("--json", action="store_true", help="print the state as JSON")
    args = parser.parse_args()
    s = state(args.max_load_per_core, args.busy_percent)
    if args.json:
        print(json.dumps(s, indent=1))
    else:
        isa = ", ".join(f for f, on in s["isa"].items() if on) or "none of " + ", ".join(ISA_FLAGS)
        print(f"{'quiet' if s['quiet'] else 'NOT quiet'}: {_reason(s)}")
        print(f"load {s['load_avg_1_5_15']} (limit {s['load_limit']:g} = {args.max_load_per_core:g} x "
              f"{cpus()} CPUs); busy above {args.busy_percent:g}% of a CPU: {len(s['busy_processes'])}")
        for p in s["busy_processes"]:
            print(f"  {p['pid']:>7} {p['cpu_percent']:>6}%  {p['cmdline']}")
        print(f"cpu {s['cpu_model']}, {s['vcpus']} vCPUs; ISA: {isa}")
    sys.exit(0 if s["quiet"] else 2)


if __name__ == "__main__":
    main()
