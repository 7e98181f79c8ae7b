"""vLLM plugin entry point (`vllm.general_plugins` -> `unipool`).

vLLM calls `register()` in every process it starts (engine core, each worker), so
the spawned workers see the architecture too; it must stay cheap and idempotent.
The model class is registered by a lazy "module:Class" string, so vLLM imports the
model file only when a `unipool` checkpoint is actually loaded.
"""

from __future__ import annotations

import logging

ARCHITECTURE = "UniPoolForCausalLM"
MODEL_CLASS_PATH = "unipool_serve.model_executor.vllm_model:UniPoolForCausalLM"


def register_config() -> None:
    """Teach transformers' AutoConfig the `unipool` model type (idempotent)."""
    from transformers import AutoConfig

    from unipool_serve.model_executor.config import UniPoolConfig

    AutoConfig.register(UniPoolConfig.model_type, UniPoolConfig, exist_ok=True)


class _ToVllmLogging(logging.Handler):
    """Hands our records to vLLM's logger, whatever handlers vLLM gives it (it configures
    logging in each process when it starts, after plugins may have loaded)."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("vllm").handle(record)


def share_vllm_logging() -> None:
    """Our loggers (`unipool_serve.*`) print through vLLM's handlers, in its format (process name
    and pid first), at INFO; without this only their warnings reached stderr."""
    ours = logging.getLogger("unipool_serve")
    if not any(isinstance(h, _ToVllmLogging) for h in ours.handlers):
        ours.addHandler(_ToVllmLogging())
        ours.setLevel(logging.INFO)
        ours.propagate = False


def register() -> None:
    """Register the HF config class and the vLLM model class; safe to call repeatedly."""
    register_config()
    share_vllm_logging()

    from unipool_serve.model_executor import lifecycle, ray_cpu

    lifecycle.install()  # the API process alone stops the engine core and the workers

    ray_cpu.install()  # `--distributed-executor-backend ray` on the CPU build (a no-op without Ray)

    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS_PATH)
