"""Make `AutoConfig` / `AutoModelForCausalLM` know our `model_type: "unipool"` folders."""

from __future__ import annotations


def register_hf() -> None:
    """Register the config and the reference model with transformers; safe to call repeatedly."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..config import UniPoolConfig
    from .model import UniPoolForCausalLM

    AutoConfig.register(UniPoolConfig.model_type, UniPoolConfig, exist_ok=True)
    AutoModelForCausalLM.register(UniPoolConfig, UniPoolForCausalLM, exist_ok=True)
