"""Write complete, loadable model folders with seeded random weights (for tests and benchmarks)."""

from __future__ import annotations

from pathlib import Path

import torch

from unipool_serve.model_executor.config import UniPoolConfig
from unipool_serve.model_executor.reference.model import UniPoolForCausalLM
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, write_small_tokenizer

# Small and vLLM-CPU friendly: head_dim 64, widths multiples of 32.
TINY_DEFAULTS = dict(
    vocab_size=384, hidden_size=128, num_hidden_layers=4, num_attention_heads=2,
    num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
    num_experts=8, num_experts_per_tok=1, expert_intermediate_size=64,
    router_type="norm", initializer_range=0.05,
    pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
)


def tiny_config(**overrides) -> UniPoolConfig:
    return UniPoolConfig(**{**TINY_DEFAULTS, **overrides})


def write_tiny_model(path: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                     every_byte_tokenizer: bool = False, **config_overrides) -> Path:
    """Write config.json, model.safetensors and tokenizer files for any config into `path`.

    Weights are drawn from a generator seeded with `seed`, so a folder is reproducible.
    NormRouter scales are drawn around 1 so that they are really exercised. The tokenizer's
    ids all decode to text unless `every_byte_tokenizer` (demo/tokenizer.py).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(**config_overrides)
    write_small_tokenizer(path, vocab_size=config.vocab_size, every_byte=every_byte_tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = UniPoolForCausalLM(config)
        for router in model.model.routers:
            if router.norm_scale is not None:
                router.norm_scale.data.uniform_(0.5, 1.5)
    model.to(dtype).save_pretrained(str(path))
    return path
