"""Where an offline vLLM engine's processes run, pinned, and how much CPU time they spend.

vLLM's CPU build (0.32) binds its worker's OpenMP threads (vllm/utils/ompmultiprocessing.py:
OMP_PLACES, GOMP_CPU_AFFINITY or KMP_AFFINITY in the worker's environment; on x86 the LAST
CPU is reserved and the OpenMP threads get the others), but leaves the rest to the scheduler:
the engine-core process (a busy loop), the worker's other threads, and this driver process.
On a 2-vCPU machine those land wherever the kernel puts them, one engine start differently
from the next. After `vllm.LLM(...)` has started in this process:

    layout = EngineLayout.find(pin=True)   # the engine's processes; pinned unless pin=False
    t = layout.cpu_times()                 # {"worker": s, "engine_core": s, "driver": s}, CPU seconds
    ...                                    # measure
    layout.cpu_times()                     # again; the difference is what the measurement cost
    record = layout.as_dict() | {"check": layout.verify()}
    layout.release()                       # before the engine stops and the next one starts

Pinned: every thread of each worker to the CPUs its OpenMP threads are bound to (read from
/proc/<pid>/environ; when vLLM set none, vLLM's own rule: the allowed CPUs less the last), and
every thread of the engine core, of any other child, and of this driver to the CPUs left over
(vLLM's reserved CPU). Threads started later inherit the CPUs of the thread that starts them.
`release()` gives the driver back its CPUs: a driver left on the reserved CPU would hand only
that CPU to the next engine it starts (vLLM derives its binding from the affinity it inherits).

  python benchmarks/engine_layout.py PID...   # each thread's Cpus_allowed_list (a hand check)
"""

from __future__ import annotations

import os
import re
import sys

import psutil

BIND_VARS = ("OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY", "OMP_NUM_THREADS", "OMP_PROC_BIND")


def parse_cpu_list(text: str) -> list[int]:
    """'0-3,6', '0 1 2', '0-7:2', '{0,1},{2}', '{0:4}' (OpenMP start:length[:stride]) -> sorted CPU ids."""
    cpus: set[int] = set()
    for start, length, stride in re.findall(r"\{\s*(\d+)\s*:\s*(\d+)\s*(?::\s*(\d+))?\s*\}", text):
        cpus.update(range(int(start), int(start) + int(length) * int(stride or 1), int(stride or 1)))
    text = re.sub(r"\{\s*\d+\s*:[^}]*\}", " ", text)
    for lo, hi, stride in re.findall(r"(\d+)\s*-\s*(\d+)(?::(\d+))?", text):
        cpus.update(range(int(lo), int(hi) + 1, int(stride or 1)))
    text = re.sub(r"\d+\s*-\s*\d+(?::\d+)?", " ", text)
    cpus.update(int(n) for n in re.findall(r"\d+", text))
    return sorted(cpus)


def process_env(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items = f.read().split(b"\0")
    except OSError:
        return {}
    return dict(item.decode(errors="replace").split("=", 1) for item in items if b"=" in item)


def omp_cpus(pid: int, allowed: list[int]) -> tuple[list[int], str]:
    """The CPUs a worker's OpenMP threads are bound to, and where that was read."""
    env = process_env(pid)
    if "OMP_PLACES" in env:
        return parse_cpu_list(env["OMP_PLACES"]), "OMP_PLACES=" + env["OMP_PLACES"]
    if "GOMP_CPU_AFFINITY" in env:
        return parse_cpu_list(env["GOMP_CPU_AFFINITY"]), "GOMP_CPU_AFFINITY=" + env["GOMP_CPU_AFFINITY"]
    match = re.search(r"proclist=\[([^\]]*)\]", env.get("KMP_AFFINITY", ""))
    if match:
        return parse_cpu_list(match.group(1)), "KMP_AFFINITY proclist"
    # vLLM's rule on x86 (ompmultiprocessing._get_autobind_cpu_ids): the last CPU is reserved
    return (allowed[:-1] or allowed), "vLLM's rule (last CPU reserved): no binding in the worker's environment"


def thread_affinities(pid: int) -> dict[int, tuple[str, str]]:
    """{tid: (thread name, Cpus_allowed_list)} of every thread of pid."""
    out = {}
    for tid in sorted(int(t) for t in os.listdir(f"/proc/{pid}/task")):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                allowed = next(l.split(":", 1)[1].strip() for l in f if l.startswith("Cpus_allowed_list"))
            out[tid] = (comm, allowed)
        except (OSError, StopIteration):
            pass  # the thread ended meanwhile
    return out


def pin_threads(pid: int, cpus: list[int]) -> int:
    """Every current thread of pid onto cpus (sched_setaffinity per thread id); returns how many."""
    pinned = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
            pinned += 1
        except (ProcessLookupError, FileNotFoundError):
            pass
    return pinned


def _role(proc: psutil.Process) -> str:
    try:
        text = (proc.name() + " " + " ".join(proc.cmdline())).lower()
    except psutil.Error:
        return "gone"
    if "enginecore" in text or "engine_core" in text:
        return "engine_core"
    if "resource_tracker" in text or "semaphore_tracker" in text:
        return "other"
    if "worker" in text or any(v in process_env(proc.pid) for v in ("OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY")):
        return "worker"
    return "other"


def _cpu_s(pid: int) -> float:
    """CPU seconds of pid so far: the on-CPU time of its threads (/proc/<pid>/task/*/schedstat, ns
    resolution, user and system together); psutil's user+system (clock ticks, 10 ms) where the kernel
    keeps no schedstat. Time of threads that have ended is not counted by the former."""
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass  # a thread that ended meanwhile
        if total:
            return total / 1e9
    except OSError:
        pass
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return float("nan")


class EngineLayout:
    """The processes of the offline engine this process started (see the module doc)."""

    def __init__(self, workers: list[int], engine_cores: list[int], others: list[int], pin: bool):
        self.driver = os.getpid()
        self.driver_cpus_before = sorted(os.sched_getaffinity(0))
        self.workers, self.engine_cores, self.others = workers, engine_cores, others
        self.pinned = False
        allowed = self.driver_cpus_before
        self.worker_cpus = {pid: omp_cpus(pid, allowed) for pid in workers}
        bound = {c for cpus, _ in self.worker_cpus.values() for c in cpus}
        self.reserved = [c for c in allowed if c not in bound] or allowed[-1:]
        self.binding_env = {pid: {k: v for k, v in process_env(pid).items() if k in BIND_VARS} for pid in workers}
        self.note = "" if workers else "no worker process found (engine core in this process?): nothing pinned"
        if pin and workers:
            self.pin()

    @classmethod
    def find(cls, pin: bool = True) -> EngineLayout:
        """The engine's processes among this process's children (call after LLM(...) has returned)."""
        roles: dict[str, list[int]] = {"worker": [], "engine_core": [], "other": [], "gone": []}
        for child in psutil.Process().children(recursive=True):
            roles[_role(child)].append(child.pid)
        return cls(roles["worker"], roles["engine_core"], roles["other"], pin)

    def pin(self) -> None:
        for pid, (cpus, _) in self.worker_cpus.items():
            pin_threads(pid, cpus)
        for pid in self.engine_cores + self.others:
            pin_threads(pid, self.reserved)
        pin_threads(self.driver, self.reserved)
        self.pinned = True

    def release(self) -> None:
        """This driver back on the CPUs it had (before the next engine starts)."""
        pin_threads(self.driver, self.driver_cpus_before)

    def cpu_times(self) -> dict[str, float]:
        """Cumulative CPU seconds (user+system, see _cpu_s): all workers, all engine-core processes, this driver."""
        return {"worker": sum(_cpu_s(p) for p in self.workers),
                "engine_core": sum(_cpu_s(p) for p in self.engine_cores), "driver": _cpu_s(self.driver)}

    def intended(self) -> dict[int, list[int]]:
        return {**{pid: cpus for pid, (cpus, _) in self.worker_cpus.items()},
                **{pid: self.reserved for pid in self.engine_cores + self.others + [self.driver]}}

    def verify(self) -> dict:
        """Per process: its threads' CPU sets now ({cpu list: thread count}) and, when pinned, how many
        threads are off the intended CPUs (threads started since pinning inherit, so 0 is expected)."""
        out = {}
        for pid, cpus in self.intended().items():
            try:
                threads = thread_affinities(pid)
            except OSError:
                continue
            sets: dict[str, int] = {}
            for _, allowed in threads.values():
                sets[allowed] = sets.get(allowed, 0) + 1
            entry = {"threads": len(threads), "cpu_sets": sets}
            if self.pinned:
                entry["threads_off_intended"] = sum(1 for _, a in threads.values() if parse_cpu_list(a) != cpus)
            out[str(pid)] = entry
        return out

    def as_dict(self) -> dict:
        return {"pinned": self.pinned, "note": self.note, "driver": {"pid": self.driver, "cpus": self.reserved
                if self.pinned else self.driver_cpus_before, "cpus_before": self.driver_cpus_before},
                "workers": [{"pid": pid, "omp_cpus": cpus, "omp_binding_from": source, "binding_env":
                             self.binding_env[pid]} for pid, (cpus, source) in self.worker_cpus.items()],
                "engine_core": self.engine_cores, "other_children": self.others, "reserved_cpus": self.reserved,
                "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto (unset)")}

    def wait_gone(self, timeout: float = 30.0) -> list[int]:
        """After the engine's shutdown: wait for its processes to exit; returns those still alive."""
        procs = []
        for pid in self.workers + self.engine_cores:
            try:
                procs.append(psutil.Process(pid))
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        return [p.pid for p in alive]


def cpu_seconds_per_token(before: dict[str, float], after: dict[str, float], tokens: int) -> dict[str, float]:
    """CPU seconds spent per generated token by each process kind between two cpu_times()."""
    return {k: (after[k] - before[k]) / max(tokens, 1) for k in after}


def main() -> None:
    for pid in (int(p) for p in sys.argv[1:]):
        print(f"pid {pid}:")
        for tid, (comm, allowed) in thread_affinities(pid).items():
            print(f"  {tid:>8} {comm:<16} Cpus_allowed_list: {allowed}")
    if len(sys.argv) < 2:
        print(__doc__)


if __name__ == "__main__":
    main()
