"""The model shapes the CPU engine benchmarks measure at, and the writers of their model folders.

One place for both bench_idle_seam.py and bench_plugin_vs_mixtral.py (and, through the latter's
wrappers, benchmarks/serving/models.py):

  tiny   L 4, H 256, F 512, E 8, top-2, fp32: the old default of bench_plugin_vs_mixtral. Expert
         weights are 12 MiB in all (vanilla), a step is mostly per-op overhead (routing, the
         steering seam, attention bookkeeping): where a seam's cost shows most.
  big    L 8, H 1024, F 2816, E 16 per pool, top-2, bf16: expert bytes dominate a step. One
         expert is 3 x H x F x 2 B = 16.5 MiB; the vanilla layout (and Mixtral) holds L x E = 128
         of them, 2.1 GiB in bf16, so vLLM's process of ~3 GiB plus the KV cache still fits a
         24 GiB machine with room for the model writer's fp32 copy (4.2 GiB) while it writes; our
         global pool holds E = 16 (264 MiB). A decode step of 16 requests reads ~14 of 16 experts
         per layer: ~1.8 GiB per step for the vanilla layout, well past the 32 MiB L3. F = 2816 is
         Mixtral's ratio F/H = 2.75 (14336 / 4096 in Mixtral 8x7B); heads of 64 (16 query, 4 KV).
  smoke  the smallest model that exercises the same code paths (scripts' --smoke).

Attention: H/64 query heads of 64, H/256 KV heads (at least 1); vocabulary 384. Folders are
written in `write_dtype` (fp32 for tiny and smoke, bf16 for big: half the bytes to write);
the engine serves `dtype`.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class ShapeSet:
    name: str
    layers: int
    hidden: int
    width: int  # expert width F
    experts: int  # per pool (ours) / per layer (Mixtral)
    top_k: int
    dtype: str  # what the engine serves
    write_dtype: str = "float32"
    vocab: int = 384
    max_positions: int = 1024

    def expert_bytes(self) -> int:
        return 3 * self.hidden * self.width * {"float32": 4, "bfloat16": 2, "float16": 2}[self.dtype]

    def describe(self) -> dict:
        per_layer = self.layers * self.experts * self.expert_bytes()
        return {**asdict(self), "expert_bytes": self.expert_bytes(), "vanilla_expert_bytes": per_layer,
                "global_pool_expert_bytes": self.experts * self.expert_bytes()}


SHAPE_SETS = {
    "tiny": ShapeSet("tiny", layers=4, hidden=256, width=512, experts=8, top_k=2, dtype="float32"),
    "big": ShapeSet("big", layers=8, hidden=1024, width=2816, experts=16, top_k=2, dtype="bfloat16",
                    write_dtype="bfloat16"),
    "smoke": ShapeSet("smoke", layers=2, hidden=64, width=64, experts=8, top_k=2, dtype="float32"),
}


def config_fields(layers: int, hidden: int, width: int, experts: int, top_k: int, vocab: int = 384,
                  max_positions: int = 1024) -> dict:
    """UniPoolConfig fields of these shapes (Mixtral's writer maps them onto MixtralConfig)."""
    return dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=max(1, hidden // 64),
                num_key_value_heads=max(1, hidden // 256), head_dim=64, num_experts=experts,
                num_experts_per_tok=top_k, expert_intermediate_size=width, vocab_size=vocab,
                max_position_embeddings=max_positions)


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def write_unipool(path: Path, fields: dict, layers_per_pool: int, write_dtype: str = "float32") -> Path:
    """Our model with Mixtral's routing rule (softmax top-k, renormalised); layers_per_pool=1: the
    vanilla layout, = layers: one global pool."""
    from unipool_serve.demo.tiny_model import write_tiny_model

    return write_tiny_model(path, seed=0, dtype=_torch_dtype(write_dtype), router_type="softmax",
                            norm_topk_prob=True, layers_per_pool=layers_per_pool, **fields)


def write_mixtral(path: Path, vanilla: Path) -> Path:
    """vLLM's built-in MixtralForCausalLM holding the vanilla folder's own weights.

    Two random models route differently (how many distinct experts a step reads, so how many
    bytes it streams, is a property of the weights), so a Mixtral drawn on its own would compare
    two models, not two servers. Here every tensor is the vanilla layout's: pool l's gate_up rows
    become layer l's experts' w1 (gate) and w3 (up), its down_proj their w2, router l the layer's
    gate. Both folders then compute the same function (tests/benchmarks/test_mixtral_twin.py).
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import MixtralConfig

    from unipool_serve.model_executor.config import UniPoolConfig

    ours = UniPoolConfig.from_pretrained(str(vanilla))
    if (ours.layers_per_pool, ours.layers_per_router, ours.router_type, ours.norm_topk_prob,
            ours.shared_expert_intermediate_size) != (1, 1, "softmax", True, 0):
        raise ValueError(f"{vanilla}: a Mixtral twin needs the vanilla layout (one pool and router per layer, "
                         "softmax top-k renormalised, no shared expert)")
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(vanilla).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    dtype = tensors["model.embed_tokens.weight"].dtype
    width = ours.expert_intermediate_size
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        parts = name.split(".")
        if parts[1] == "pools":
            continue
        if parts[1] == "routers":
            out[f"model.layers.{parts[2]}.block_sparse_moe.gate.weight"] = tensor.to(dtype)
        else:
            out[name] = tensor
    for layer in range(ours.num_hidden_layers):
        gate_up = tensors[f"model.pools.{layer}.gate_up_proj"]  # [E, 2F, H], gate rows first
        down = tensors[f"model.pools.{layer}.down_proj"]  # [E, H, F]
        for e in range(ours.num_experts):
            prefix = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
            out[f"{prefix}.w1.weight"] = gate_up[e, :width].contiguous()
            out[f"{prefix}.w3.weight"] = gate_up[e, width:].contiguous()
            out[f"{prefix}.w2.weight"] = down[e].contiguous()
    config = MixtralConfig(
        vocab_size=ours.vocab_size, hidden_size=ours.hidden_size, intermediate_size=width,
        num_hidden_layers=ours.num_hidden_layers, num_attention_heads=ours.num_attention_heads,
        num_key_value_heads=ours.num_key_value_heads, head_dim=ours.head_dim, num_local_experts=ours.num_experts,
        num_experts_per_tok=ours.num_experts_per_tok, max_position_embeddings=ours.max_position_embeddings,
        rope_theta=ours.rope_parameters["rope_theta"], rms_norm_eps=ours.rms_norm_eps, tie_word_embeddings=False,
        bos_token_id=ours.bos_token_id, eos_token_id=ours.eos_token_id, pad_token_id=ours.pad_token_id,
        architectures=["MixtralForCausalLM"], dtype=str(dtype).removeprefix("torch."),
    )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(path))
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    for f in Path(vanilla).iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, path / f.name)
    return path


def write_models(work: Path, shape: ShapeSet, which: tuple[str, ...]) -> dict[str, Path]:
    """Model folders of `shape` under work/: any of "vanilla", "global", "mixtral" (Mixtral holds the
    vanilla folder's weights and tokenizer, so that is written too)."""
    fields = config_fields(shape.layers, shape.hidden, shape.width, shape.experts, shape.top_k, shape.vocab,
                           shape.max_positions)
    out: dict[str, Path] = {}
    if "vanilla" in which or "mixtral" in which:
        out["vanilla"] = write_unipool(Path(work) / "unipool_vanilla", fields, 1, shape.write_dtype)
    if "global" in which:
        out["global"] = write_unipool(Path(work) / "unipool_global", fields, shape.layers, shape.write_dtype)
    if "mixtral" in which:
        out["mixtral"] = write_mixtral(Path(work) / "mixtral", out["vanilla"])
    return out
