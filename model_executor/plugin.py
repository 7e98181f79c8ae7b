"""vLLM plugin entry point (`vllm.general_plugins` -> `unipool`).

vLLM calls `register()` in every process it starts (engine core, each worker), so
the spawned workers see the architecture too; it must stay cheap and idempotent.
The model class is registered by a lazy "module:Class" string, so vLLM imports the
model file only when a `unipool` checkpoint is actually loaded.
"""

from __future__ import annotations

ARCHITECTURE = "UniPoolForCausalLM"
MODEL_CLASS_PATH = "unipool_serve.model_executor.vllm_model:UniPoolForCausalLM"


def register_config() -> None:
    """Teach transformers' AutoConfig the `unipool` model type (idempotent)."""
    from transformers import AutoConfig

    from unipool_serve.model_executor.config import UniPoolConfig

    AutoConfig.register(UniPoolConfig.model_type, UniPoolConfig, exist_ok=True)


def register() -> None:
    """Register the HF config class and the vLLM model class; safe to call repeatedly."""
    register_config()

    from unipool_serve.model_executor import ray_cpu

    ray_cpu.install()  # `--distributed-executor-backend ray` on the CPU build (a no-op without Ray)

    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS_PATH)
