"""`unipool-convert prune`: a smaller model folder that keeps each pool's most used experts.

Usage per pool expert comes from a running server or a calibration run (model_executor/
usage.py). Each pool keeps its N most used experts (ties to the lower id), in their
original order; pools whose layers share a router (a PathMoE block spanning pools) keep
one common set, ranked by their summed usage, since the router's rows index all of them.
The pools and the routers' rows are sliced, `num_experts` becomes N, and a NormRouter keeps
its constant c. The pruned model is then exactly the original model run with the pruned
experts excluded (kernels/routing_reference.py's exclusion: removed from the score function,
for a NormRouter zeroed before its L2 norm), which is what a sub-pool profile of the same
experts does at serving time (`unipool-steering subpool`). Against the unsteered original:
which of the kept experts a token picks is unchanged (each router ranks them alike); gate
values are unchanged for sigmoid routers and renormalised softmax routers, and change for a
NormRouter (its norm runs over fewer logits) and plain softmax (fewer terms). Steering profiles in the model's `steering/` folder are carried over with their
columns remapped, unless one includes a pruned expert or would leave a layer too few experts.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from unipool_serve.model_executor.config import UniPoolConfig
from unipool_serve.model_executor.steering.profile import SteeringProfile, SteeringProfileError
from .errors import ConversionError
from .output_folder import check_new_folder, output_folder

WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json")


@dataclass
class PruneReport:
    out_dir: Path
    kept: dict[int, list[int]]  # pool -> original expert ids kept
    coverage: dict[int, float]  # pool -> share of its routed token-slots the kept experts took
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        pools = "; ".join(f"pool {p}: kept {ids} ({100 * self.coverage[p]:.1f}% of its routed token-slots)"
                          for p, ids in sorted(self.kept.items()))
        return f"wrote {self.out_dir}: {pools}"


def check_keep(config: UniPoolConfig, keep: int) -> None:
    if not config.num_experts_per_tok <= keep < config.num_experts:
        raise ConversionError(f"--keep {keep}: must be at least top_k={config.num_experts_per_tok} and below the "
                              f"pool size {config.num_experts}")


def kept_experts(usage: torch.Tensor, config: UniPoolConfig, keep: int) -> dict[int, list[int]]:
    """pool -> the `keep` most used expert ids (ascending), shared by pools that share a router."""
    check_keep(config, keep)
    group = list(range(config.num_pools))  # union of pools that one router serves

    def root(p: int) -> int:
        while group[p] != p:
            p = group[p]
        return p

    for r in range(config.num_routers):
        pools = {config.layer_to_pool(l) for l in range(config.num_hidden_layers) if config.layer_to_router(l) == r}
        first = root(min(pools))
        for p in pools:
            group[root(p)] = first
    kept = {}
    for p in range(config.num_pools):
        members = [q for q in range(config.num_pools) if root(q) == root(p)]
        total = usage[members].sum(0)
        order = sorted(range(config.num_experts), key=lambda e: (-float(total[e]), e))
        kept[p] = sorted(order[:keep])
    return kept


def prune_model(model_dir: Path, out_dir: Path, keep: int, usage: torch.Tensor) -> PruneReport:
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_new_folder(out_dir)
    config = UniPoolConfig.from_pretrained(str(model_dir))
    if tuple(usage.shape) != (config.num_pools, config.num_experts):
        raise ConversionError(f"usage covers {tuple(usage.shape)} (pools, experts); the model has "
                              f"({config.num_pools}, {config.num_experts})")
    kept = kept_experts(usage, config, keep)
    router_pool = {config.layer_to_router(l): config.layer_to_pool(l) for l in range(config.num_hidden_layers)}
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                parts = name.split(".")
                if name.startswith("model.pools."):
                    tensor = tensor[kept[int(parts[2])]]  # [E, ...] -> [N, ...]
                elif name.startswith("model.routers.") and name.endswith(".weight"):
                    tensor = tensor[kept[router_pool[int(parts[2])]]]  # [E, H] -> [N, H]
                tensors[name] = tensor.contiguous()
    if not tensors:
        raise ConversionError(f"{model_dir} holds no *.safetensors weights")
    pruned = UniPoolConfig.from_dict({**config.to_dict(), "num_experts": keep})  # c (if any) kept as it is
    report = PruneReport(out_dir, kept, {p: float(usage[p, ids].sum() / usage[p].sum().clamp_min(1e-12))
                                         for p, ids in kept.items()})
    with output_folder(out_dir) as tmp:
        for item in model_dir.iterdir():
            if item.name == "steering" or any(item.match(pattern) for pattern in WEIGHT_FILES):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        pruned.save_pretrained(str(tmp))
        _carry_profiles(model_dir / "steering", tmp / "steering", config, pruned, kept, report)
    return report


def _carry_profiles(source: Path, target: Path, config: UniPoolConfig, pruned: UniPoolConfig,
                    kept: dict[int, list[int]], report: PruneReport) -> None:
    if not source.is_dir():
        return
    target.mkdir()
    for path in sorted(source.glob("*.safetensors")):
        try:
            profile = SteeringProfile.load(path, config)
            columns = [kept[config.layer_to_pool(l)] for l in range(config.num_hidden_layers)]
            new_id = [{old: new for new, old in enumerate(ids)} for ids in columns]
            if any(e not in new_id[l] for l, ids in profile.include.items() for e in ids):
                raise SteeringProfileError("it includes a pruned expert")
            bias = torch.stack([profile.bias[l, ids] for l, ids in enumerate(columns)])
            remap = lambda sets: {l: [new_id[l][e] for e in ids if e in new_id[l]] for l, ids in sets.items()}  # noqa: E731
            carried = SteeringProfile.for_config(
                pruned, name=profile.name, bias=bias, alpha=profile.alpha, include=remap(profile.include),
                exclude={l: ids for l, ids in remap(profile.exclude).items() if ids},
                description=profile.description, expert_budget=profile.expert_budget)
            carried.save(target / path.name)
        except SteeringProfileError as exc:
            report.notes.append(f"steering profile {path.name} not carried over: {exc}")
