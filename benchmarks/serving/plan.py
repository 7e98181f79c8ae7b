"""What one harness run measures: modes, engine settings, and the server phases.

Every server gets the same engine settings (the mode's engine_args and env, VLLM_CPU_KVCACHE_SPACE)
except the two memory-budget servers, which get an explicit KV size instead.

The `goals` mode is issue-style acceptance at the engine benchmarks' big shape: compiled servers
with huge pages for torch's allocator (docs/deploy.md), `unipool-serve` with the global pool and
`vllm serve` with the same-shape Mixtral both swept at concurrency 1, 16 and 64, steering half the
requests vs none, and the pool against Mixtral at equal memory under concurrency 64. Its repeats
run the servers in turn (A B A B ...), so a slow stretch of the machine hits both sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .load import Workload
from .models import GOALS_SHAPE, QUICK_SHAPE, SMOKE_SHAPE, Shape
from .server import ServerSpec

# Eager mode: torch.compile costs ~40-50 s per engine start on these machines and a
# full run starts ~20 servers; every server, ours and vLLM's Mixtral alike, runs eager.
ENGINE_ARGS = ["--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "128",
               "--no-enable-prefix-caching", "--dtype", "bfloat16"]
KV_SPACE_GIB = "1"
# "http": vLLM's Mixtral swept at every concurrency beside unipool-serve (not only at compare_at)
COMPARISONS = ("steering", "metrics", "frontend", "plugin", "pool", "budget", "reference", "http")


@dataclass(frozen=True)
class Mode:
    name: str
    shape: Shape
    workload: Workload
    concurrencies: tuple[int, ...]
    compare_at: int  # concurrency of the side-by-side comparisons
    budget_at: int  # concurrency of the memory-budget comparison
    budget_kv_seqs: int  # sequences the vanilla layout's KV room holds under the budget
    repeats: int
    waves: int  # prompts per point = waves x concurrency (at least 8)
    comparisons: tuple[str, ...] = COMPARISONS
    engine_args: tuple[str, ...] = tuple(ENGINE_ARGS)
    env: tuple[tuple[str, str], ...] = ()  # for every server
    budget_baseline: str = "vanilla"  # the model the reduced pool is held against at equal memory
    offline_reference: bool = True  # u_l and HF generate with the reference model, after the servers
    doc_section: str = "serving-harness"  # the marked section of docs/benchmarks.md this mode writes

    @property
    def compiled(self) -> bool:
        return "--enforce-eager" not in self.engine_args

    def with_dtype(self, shape_dtype: str) -> Mode:
        from dataclasses import replace

        return replace(self, shape=replace(self.shape, dtype=shape_dtype),
                       engine_args=tuple(a if a not in ("bfloat16", "float32") else shape_dtype
                                         for a in self.engine_args))


MODES = {
    "full": Mode("full", QUICK_SHAPE, Workload(128, 64), (1, 8, 32, 128), compare_at=32, budget_at=32,
                 budget_kv_seqs=8, repeats=3, waves=4),
    "quick": Mode("quick", QUICK_SHAPE, Workload(128, 64), (1, 8), compare_at=8, budget_at=16,
                  budget_kv_seqs=4, repeats=1, waves=4),
    "smoke": Mode("smoke", SMOKE_SHAPE, Workload(32, 8), (1,), compare_at=1, budget_at=4, budget_kv_seqs=1,
                  repeats=1, waves=8, comparisons=("steering",)),
    "goals": Mode("goals", GOALS_SHAPE, Workload(128, 64), (1, 16, 64), compare_at=16, budget_at=64,
                  budget_kv_seqs=16, repeats=3, waves=2, comparisons=("http", "steering", "budget"),
                  engine_args=tuple(a for a in ENGINE_ARGS if a != "--enforce-eager"),
                  env=(("THP_MEM_ALLOC_ENABLE", "1"),), budget_baseline="mixtral", offline_reference=False,
                  doc_section="serving-goals"),
}


@dataclass
class Phase:
    """One server start and the measurements taken while it runs."""

    spec: ServerSpec
    model_key: str  # "unipool" | "vanilla" | "mixtral"
    sweep: bool = False  # the concurrency sweep with vLLM's client
    compare: bool = False  # one vLLM-client point at mode.compare_at
    steering: bool = False  # steering off/on with the custom client at mode.compare_at
    budget: bool = False  # one vLLM-client point at mode.budget_at
    notes: dict = field(default_factory=dict)


def phases(mode: Mode, models: dict[str, Path], steering_dir: Path, budget_kv: dict[str, int]) -> list[Phase]:
    args = list(mode.engine_args)
    kv = {**dict(mode.env), "VLLM_CPU_KVCACHE_SPACE": KV_SPACE_GIB}
    want = set(mode.comparisons)
    out = [Phase(ServerSpec("unipool-serve", "unipool-serve", models["unipool"], args,
                            env={**kv, "UNIPOOL_ROUTING_STATS": "1"}, steering_dir=steering_dir),
                 "unipool", sweep=True, compare=True, steering="steering" in want)]
    if "metrics" in want:
        out.append(Phase(ServerSpec("unipool-serve-stats-off", "unipool-serve", models["unipool"], args,
                                    env={**kv, "UNIPOOL_ROUTING_STATS": "0"}, steering_dir=steering_dir),
                         "unipool", compare=True))
    if want & {"frontend", "pool"}:
        out.append(Phase(ServerSpec("vllm-unipool", "vllm", models["unipool"], args, env=kv), "unipool", compare=True))
    if want & {"plugin", "pool"}:
        out.append(Phase(ServerSpec("vllm-vanilla", "vllm", models["vanilla"], args, env=kv), "vanilla", compare=True))
    if want & {"plugin", "http"}:
        out.append(Phase(ServerSpec("vllm-mixtral", "vllm", models["mixtral"], args, env=kv), "mixtral",
                         sweep="http" in want, compare=True))
    if "budget" in want:
        for key in (mode.budget_baseline, "unipool"):
            # An explicit KV size in bytes; the GiB-granular VLLM_CPU_KVCACHE_SPACE must be unset.
            spec = ServerSpec(f"budget-{key}", "vllm", models[key],
                              [*args, "--kv-cache-memory-bytes", str(budget_kv[key])],
                              env={**dict(mode.env), "VLLM_CPU_KVCACHE_SPACE": None})
            out.append(Phase(spec, key, budget=True))
    return out
