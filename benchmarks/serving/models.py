"""Benchmark model folders: a UniPool pool, the vanilla per-layer layout, and a Mixtral twin.

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
from unipool_serve.model_executor.steering_profile import SteeringProfile
from unipool_serve.model_executor.tiny_model import write_tiny_model
from unipool_serve.model_executor.tokenizer import BOS_ID, EOS_ID, PAD_ID, write_small_tokenizer

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

    @property
    def pool_size(self) -> int:
        return self.layers * self.experts_per_layer // 2

    def expert_bytes(self) -> int:
        return 3 * self.hidden * self.width * DTYPES[self.dtype].itemsize

    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * DTYPES[self.dtype].itemsize


QUICK_SHAPE = Shape()
SMOKE_SHAPE = Shape(hidden=128, layers=2, heads=2, kv_heads=1, width=128, experts_per_layer=8)


def _unipool_overrides(shape: Shape) -> dict:
    return dict(
        vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
        max_position_embeddings=shape.max_positions, expert_intermediate_size=shape.width,
        num_experts_per_tok=shape.top_k, initializer_range=0.02,
    )


def write_unipool(path: Path, shape: Shape, *, seed: int = 0) -> Path:
    """One global pool of L * E_layer / 2 experts, NormRouter (the UniPool layout)."""
    return write_tiny_model(path, seed=seed, dtype=DTYPES[shape.dtype], num_experts=shape.pool_size,
                            layers_per_pool=shape.layers, router_type="norm", **_unipool_overrides(shape))


def write_vanilla(path: Path, shape: Shape, *, seed: int = 0) -> Path:
    """Per-layer pools of E_layer experts (vanilla MoE), softmax router like Mixtral's."""
    return write_tiny_model(path, seed=seed, dtype=DTYPES[shape.dtype], num_experts=shape.experts_per_layer,
                            layers_per_pool=1, router_type="softmax", **_unipool_overrides(shape))


def write_mixtral(path: Path, shape: Shape, *, seed: int = 0) -> Path:
    """vLLM's built-in Mixtral with the vanilla layout's active shapes and expert count."""
    from transformers import MixtralConfig, MixtralForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = write_small_tokenizer(path, vocab_size=min(shape.vocab, 320))
    config = MixtralConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.width,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, max_position_embeddings=shape.max_positions,
        num_local_experts=shape.experts_per_layer, num_experts_per_tok=shape.top_k, initializer_range=0.02,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=False,
    )
    assert len(tokenizer) <= config.vocab_size
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = MixtralForCausalLM(config)
    model.to(DTYPES[shape.dtype]).save_pretrained(str(path))
    return path


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


def weight_bytes(model_dir: Path) -> dict:
    """Bytes of every tensor in the checkpoint, split into experts and the rest."""
    total = experts = 0
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                nbytes = numel * {"BF16": 2, "F16": 2, "F32": 4}[sl.get_dtype()]
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
