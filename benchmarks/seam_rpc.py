"""Functions the benchmarks run inside an engine's worker through `LLM.collective_rpc(fn, args=...)`.

The engine must be started with VLLM_ALLOW_INSECURE_SERIALIZATION=1 to take a function (the
benchmarks set it). The worker imports this module by name: spawned processes inherit the
driver's sys.path, which holds benchmarks/ when a script there runs.
"""

from __future__ import annotations


def _idle_steps(worker):
    idle_steps = getattr(worker.model_runner.get_model(), "idle_steps", None)
    if idle_steps is None:
        raise RuntimeError("this engine's model has no idle_steps (steering worker not installed?)")
    return idle_steps


def set_always_read(worker, on: bool) -> bool:
    """IdleSteps.always_read (steering/idle_steps.py): every step on the model, as it ran before the plain
    variant existed. Returns the value now set."""
    _idle_steps(worker).always_read = bool(on)
    return _idle_steps(worker).always_read


def steps_each_way(worker) -> dict[str, int]:
    """Steps run on the model ("read") and on its plain variant ("unread") so far."""
    return dict(_idle_steps(worker).steps)
