"""Ray executor on vLLM's CPU build: the three places where vLLM 0.32 needs an accelerator.

vLLM's Ray executor (RayExecutorV2, the default for `--distributed-executor-backend ray`)
places one worker per placement-group bundle of `current_platform.ray_device_key`
("GPU" on CUDA). The CPU platform leaves that key empty, so the executor stops at once:

    vllm/v1/executor/ray_utils.py, initialize_ray_cluster():
        ValueError: current platform cpu does not support ray.

Nothing else in the executor is GPU-specific on the CPU path: the control plane is
vLLM's MessageQueue (shared memory on the driver's node, TCP to other nodes), the
pipeline's data plane is torch.distributed with the CPU platform's gloo backend. This
module fills the three gaps, only on the CPU platform and only once the Ray executor
module is imported (i.e. when `--distributed-executor-backend ray` was asked for):

  1. `CpuPlatform.ray_device_key = "CPU"`: the placement group asks for one Ray CPU per
     worker, `[{"CPU": 1}] * world_size`, packed by Ray. A node offering one logical CPU
     (`ray start --num-cpus 1`) therefore takes exactly one worker; Ray's logical CPUs are
     scheduling tokens and do not limit the threads the worker uses.
  2. The actors are created with `num_cpus=0, num_gpus=0` inside their bundle (vLLM would
     pass `resources={"CPU": 1}`, which Ray rejects: CPUs are asked for with num_cpus).
  3. The actor class is `CpuRayWorkerProc`, whose `get_node_and_physical_gpu_ids` returns
     the node and no device ids (vLLM's reads `get_accelerator_ids()["CPU"]`, which Ray
     does not have).

The legacy Ray executor (VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0) runs the pipeline through a
Ray compiled graph whose channels assume an accelerator; it is refused with one line.

The plugin's `register()` (model_executor/plugin.py) calls `install()` in every process
vLLM starts; the actor processes import this module to unpickle their class, which
applies the same patches there.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

RAY_DEVICE_KEY = "CPU"
_V2 = "vllm.v1.executor.ray_executor_v2"
_LEGACY = "vllm.v1.executor.ray_executor"
LEGACY_REFUSED = ("the legacy Ray executor (VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0) needs an accelerator for its "
                  "compiled-graph channels; on the CPU build use the default Ray executor "
                  "(unset VLLM_USE_RAY_V2_EXECUTOR_BACKEND)")


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _patch_platform() -> None:
    from vllm.platforms.cpu import CpuPlatform

    CpuPlatform.ray_device_key = RAY_DEVICE_KEY


def _patch_v2(module) -> None:
    _patch_platform()
    if getattr(module, "_unipool_cpu_ray", False):
        return
    module.RayExecutorV2._get_actor_resource_kwargs = staticmethod(_actor_resource_kwargs)
    module.RayWorkerProc = _worker_class(module)
    module._unipool_cpu_ray = True


def _patch_legacy(module) -> None:
    if getattr(module, "_unipool_cpu_ray", False):
        return

    def refuse(self) -> None:
        raise ValueError(LEGACY_REFUSED)

    module.RayDistributedExecutor._init_executor = refuse
    module._unipool_cpu_ray = True


def _actor_resource_kwargs() -> dict:
    # The bundle holds the worker's one Ray CPU; the actor itself asks for nothing more
    # (vLLM passes num_cpus=0 beside these).
    return {"num_gpus": 0}


_WORKER_CLASS = None


def _worker_class(module):
    global _WORKER_CLASS
    if _WORKER_CLASS is None:
        import ray

        class CpuRayWorkerProc(module.RayWorkerProc):
            """vLLM's Ray worker process, placed by node only: a CPU worker has no device ids."""

            def get_node_and_physical_gpu_ids(self) -> tuple[str, list[int]]:
                return ray.get_runtime_context().get_node_id(), []

        # Ray ships the actor class by reference; the actor imports it from here.
        CpuRayWorkerProc.__module__ = __name__
        CpuRayWorkerProc.__qualname__ = "CpuRayWorkerProc"
        _WORKER_CLASS = CpuRayWorkerProc
        globals()["CpuRayWorkerProc"] = CpuRayWorkerProc
    return _WORKER_CLASS


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Applies the patch for a vLLM executor module right after it is first imported."""

    PATCHES = {_V2: _patch_v2, _LEGACY: _patch_legacy}

    def find_spec(self, name, path=None, target=None):
        patch = self.PATCHES.get(name)
        if patch is None:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


_installed = False


def install() -> None:
    """Make `--distributed-executor-backend ray` work on the CPU platform (idempotent, cheap:
    nothing is imported unless Ray is installed and the Ray executor is used)."""
    global _installed
    if _installed or importlib.util.find_spec("ray") is None or not _on_cpu():
        return
    _installed = True
    for name, patch in _PatchOnImport.PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
    if not all(name in sys.modules for name in _PatchOnImport.PATCHES):
        sys.meta_path.insert(0, _PatchOnImport())


def __getattr__(name: str):
    # An actor process unpickles `ray_cpu.CpuRayWorkerProc` before vLLM loads any plugin.
    if name == "CpuRayWorkerProc":
        import vllm.v1.executor.ray_executor_v2 as v2

        _patch_v2(v2)
        return _worker_class(v2)
    raise AttributeError(name)
