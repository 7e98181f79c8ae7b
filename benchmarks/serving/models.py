"""Benchmark model folders: a UniPool pool, the vanilla per-layer layout, and its Mixtral twin.

Shapes (one `Shape` per run mode) are chosen so that the MoE dominates a decode step
on vLLM CPU while a start still takes seconds: hidden 512, head_dim 64, expert width
1024, top-1. The reduced pool holds half the vanilla layout's expert budget
(L x E_layer / 2 experts in one global pool), as in the UniPool paper.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from unipool_serve.model_executor.config import UniPoolConfig
from unipool_serve.model_executor.steering.profile import SteeringProfile
from unipool_serve.demo.tiny_model import write_tiny_model

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Shape:
    """Active shapes shared by every benchmark model of one run."""

    hidden: int = 512
    layers: int = 4
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64
    width: int = 1024  # expert intermediate size F
    experts_per_layer: int = 16  # vanilla layout; the pool holds layers * this / 2
    top_k: int = 1
    vocab: int = 384
    max_positions: int = 1024
    dtype: str = "bfloat16"
    pool_experts: int | None = None  # the global pool's size; default half the vanilla budget

    @property
    def pool_size(self) -> int:
        return self.pool_experts or self.layers * self.experts_per_layer // 2

    def expert_bytes(self) -> int:
        return 3 * self.hidden * self.width * DTYPES[self.dtype].itemsize

    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * DTYPES[self.dtype].itemsize


QUICK_SHAPE = Shape()
# The engine benchmarks' "big" set (benchmarks/shapes.py): expert bytes dominate a step. The pool holds
# as many experts as one Mixtral layer (16, 264 MiB in bf16; Mixtral 128, 2.1 GiB), so that a decode
# step touches as many experts per layer on both sides: a larger pool reads more distinct experts per
# step at the same top-k (64 experts: ~25 of them per layer at 16 tokens vs ~14 of 16), a property
# of that model, not of the server.
GOALS_SHAPE = Shape(hidden=1024, layers=8, heads=16, kv_heads=4, width=2816, experts_per_layer=16, top_k=2,
                    pool_experts=16)
SMOKE_SHAPE = Shape(hidden=128, layers=2, heads=2, kv_heads=1, width=128, experts_per_layer=8)


def _plugin_bench():
    """benchmarks/bench_plugin_vs_mixtral.py, whose model writers we reuse (it sets env defaults on import)."""
    import argparse
    import importlib
    import os
    import sys

    before = dict(os.environ)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    module = importlib.import_module("bench_plugin_vs_mixtral")
    os.environ.clear()
    os.environ.update(before)
    return module, argparse.Namespace


def _shape_args(shape: Shape, experts: int):
    module, namespace = _plugin_bench()
    args = namespace(layers=shape.layers, hidden=shape.hidden, width=shape.width, experts=experts, top_k=shape.top_k)
    if module.shapes(args)["num_key_value_heads"] != shape.kv_heads or shape.head_dim != 64:
        raise ValueError(f"{shape} does not match bench_plugin_vs_mixtral's attention shapes (H/64 heads, H/256 KV heads)")
    return module, args


def write_unipool(path: Path, shape: Shape, *, seed: int = 0) -> Path:
    """One global pool of L * E_layer / 2 experts with UniPool's NormRouter."""
    module, args = _shape_args(shape, shape.pool_size)
    return write_tiny_model(path, seed=seed, dtype=DTYPES[shape.dtype], router_type="norm",
                            layers_per_pool=shape.layers, **module.shapes(args))


def write_vanilla(path: Path, shape: Shape, *, seed: int = 0) -> Path:
    """Per-layer pools of E_layer experts, Mixtral's routing rule (bench_plugin_vs_mixtral's writer)."""
    module, args = _shape_args(shape, shape.experts_per_layer)
    return module.write_unipool(Path(path), args, layers_per_pool=1)


def write_mixtral(path: Path, shape: Shape, *, seed: int = 0) -> Path:
    """vLLM's built-in Mixtral holding the vanilla layout's own weights (benchmarks/shapes.py)."""
    vanilla = write_all(Path(path).parent, shape, ("vanilla",))["vanilla"]
    module, _ = _plugin_bench()
    return module.write_mixtral(Path(path), vanilla)


def write_profiles(model_dir: Path, out_dir: Path, names=("bias", "exclude", "include")) -> list[str]:
    """Three steering profiles of different kinds (MASCing bias, exclusions, inclusions)."""
    config = UniPoolConfig.from_pretrained(str(model_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(7)
    layers, experts = config.num_hidden_layers, config.num_experts
    kinds = {
        "bias": dict(bias=torch.randn(layers, experts, generator=gen).numpy(), alpha=1.0),
        "exclude": dict(exclude={l: list(range(0, experts, 4)) for l in range(layers)}),
        "include": dict(include={l: [l % experts] for l in range(layers)}),
    }
    for name in names:
        SteeringProfile.for_config(config, name=name, **kinds[name]).save(out_dir / f"{name}.safetensors")
    return list(names)


def weight_bytes(model_dir: Path, dtype: str) -> dict:
    """Bytes of every tensor as served in `dtype` (routers stay fp32), split into experts and the rest."""
    size = DTYPES[dtype].itemsize
    total = experts = 0
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                numel = 1
                for d in f.get_slice(name).get_shape():
                    numel *= d
                nbytes = numel * (4 if ".routers." in name else size)
                total += nbytes
                if ".experts." in name or ".pools." in name:
                    experts += nbytes
    return {"total": total, "experts": experts, "other": total - experts}


def write_all(root: Path, shape: Shape, which=("unipool", "vanilla", "mixtral")) -> dict[str, Path]:
    """Write (or reuse, when the recorded shape matches) the benchmark model folders."""
    writers = {"unipool": write_unipool, "vanilla": write_vanilla, "mixtral": write_mixtral}
    out = {}
    for name in which:
        path = Path(root) / name
        stamp = path / "bench_shape.json"
        if not (stamp.exists() and json.loads(stamp.read_text()) == asdict(shape)):
            writers[name](path, shape)
            stamp.write_text(json.dumps(asdict(shape)))
        out[name] = path
    return out
