"""Plugin registration and backend selection (no engine started)."""

from importlib.metadata import entry_points

import pytest
import torch


def test_entry_point_declared():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("unipool") == "unipool_serve.model_executor.plugin:register"


def test_register_is_idempotent():
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from unipool_serve.model_executor.config import UniPoolConfig
    from unipool_serve.model_executor.plugin import register

    register()
    register()
    assert "UniPoolForCausalLM" in ModelRegistry.get_supported_archs()
    assert isinstance(AutoConfig.for_model("unipool", num_hidden_layers=2, num_experts=4), UniPoolConfig)


def test_package_import_stays_light():
    import subprocess
    import sys

    code = ("import sys, unipool_serve.model_executor, unipool_serve.model_executor.plugin, "
            "unipool_serve.model_executor.config; print('vllm' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_backend_selection():
    from unipool_serve.model_executor.moe_backend import CpuBackend, TorchBackend, select_backend

    cpu = select_backend("cpu", torch.float32, 128)
    assert isinstance(cpu, CpuBackend) and cpu.pad_to == 32
    assert cpu.isa == "vec"  # fp32 never uses amx
    assert isinstance(select_backend("cpu", torch.float32, 128, name="torch"), TorchBackend)
    assert isinstance(select_backend("cpu", torch.float32, 100), TorchBackend)  # hidden not a multiple of 32
    with pytest.raises(ValueError, match="UNIPOOL_MOE_BACKEND='bogus'"):
        select_backend("cpu", torch.float32, 128, name="bogus")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        select_backend("cpu", torch.float32, 128, name="triton")


def test_cpu_backend_matches_reference_with_padding():
    """Padded, prepacked pool through cpu_fused_moe == pool_moe on the unpadded weights."""
    from unipool_serve.kernels.moe_reference import pool_moe
    from unipool_serve.model_executor.expert_pool import ExpertPool
    from unipool_serve.model_executor.moe_backend import select_backend

    E, H, F, T, k = 6, 64, 48, 9, 2
    gen = torch.Generator().manual_seed(0)
    w13 = torch.randn(E, 2 * F, H, generator=gen) * 0.1
    w2 = torch.randn(E, H, F, generator=gen) * 0.1
    backend = select_backend("cpu", torch.float32, H)
    pool = ExpertPool(E, H, F, tp_rank=0, tp_size=1, pad_to=backend.pad_to, dtype=torch.float32)
    pool.gate_up_proj.weight_loader(pool.gate_up_proj, w13)
    pool.down_proj.weight_loader(pool.down_proj, w2)
    assert pool.padded_width == 64
    backend.prepare(pool)
    x = torch.randn(T, H, generator=gen)
    ids = torch.randint(0, E, (T, k), generator=gen, dtype=torch.int32)
    weights = torch.rand(T, k, generator=gen)
    torch.testing.assert_close(backend(x, pool, ids, weights), pool_moe(x, w13, w2, ids, weights),
                               atol=1e-5, rtol=1e-5)
    # A per-token expert budget drops slots (id E): the kept pairs alone are computed, tokens
    # with nothing kept get zero, and the result equals the reference that skips them.
    dropped = ids.clone()
    dropped[::2, 1] = E  # every other token keeps one expert
    dropped[3] = E  # one token keeps none (a routed budget of 0)
    got = backend(x, pool, dropped, weights)
    torch.testing.assert_close(got, pool_moe(x, w13, w2, dropped, weights), atol=1e-5, rtol=1e-5)
    assert got[3].abs().max() == 0


def test_ray_cpu_adapter_only_with_ray():
    """register() leaves vLLM's Ray executor alone where Ray is not installed (CI); where it is,
    importing the executor patches it for the CPU platform (model_executor/ray_cpu.py)."""
    import importlib.util
    import pickle
    import sys

    from unipool_serve.model_executor import ray_cpu
    from unipool_serve.model_executor.plugin import register

    register()
    if importlib.util.find_spec("ray") is None:
        assert not ray_cpu._installed
        assert not any(isinstance(f, ray_cpu._PatchOnImport) for f in sys.meta_path)
        return
    import vllm.v1.executor.ray_executor as legacy
    import vllm.v1.executor.ray_executor_v2 as v2
    from vllm.platforms.cpu import CpuPlatform

    assert CpuPlatform.ray_device_key == "CPU"
    assert v2.RayExecutorV2._get_actor_resource_kwargs() == {"num_gpus": 0}
    worker = v2.RayWorkerProc
    assert (worker.__module__, worker.__qualname__) == (ray_cpu.__name__, "CpuRayWorkerProc")
    assert pickle.loads(pickle.dumps(worker)) is worker  # Ray ships the actor class by reference
    with pytest.raises(ValueError, match="legacy Ray executor"):
        legacy.RayDistributedExecutor._init_executor(None)
