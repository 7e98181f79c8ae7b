"""Bad checkpoints fail at load with a message naming the tensor.

The loader's checks run in-process on a stub model (fast); one engine start shows
the same message reaching the user when vLLM itself loads a broken folder.
"""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from unipool_serve.model_executor.config import UniPoolConfig

LAYOUT = dict(layers_per_pool=2, layers_per_router=2, shared_expert_intermediate_size=64)


@pytest.fixture(scope="module")
def good_dir(tiny_model_factory):
    return tiny_model_factory("bad_ckpt_base", seed=0, **LAYOUT)


def _stub(config):
    """What load_checkpoint needs from the model: its config and named_parameters()."""
    return SimpleNamespace(config=config, named_parameters=lambda: iter(()))


def _load(folder, mutate=lambda tensors: None, **config_overrides):
    from unipool_serve.model_executor.checkpoint_loading import load_checkpoint

    tensors = load_file(str(folder / "model.safetensors"))
    mutate(tensors)
    config = UniPoolConfig.from_pretrained(str(folder), **config_overrides)
    return load_checkpoint(_stub(config), iter(tensors.items()))


def test_good_checkpoint_loads(good_dir):
    assert _load(good_dir) == set()  # the stub has no parameters; nothing raised


def test_missing_tensor_is_named(good_dir):
    with pytest.raises(ValueError, match=r"missing tensor\(s\) 'model\.routers\.1\.weight'"):
        _load(good_dir, lambda t: t.pop("model.routers.1.weight"))


def test_wrong_shape_is_named(good_dir):
    def shrink(t):
        t["model.pools.1.down_proj"] = t["model.pools.1.down_proj"][:, :, :32].contiguous()

    with pytest.raises(ValueError, match=r"'model\.pools\.1\.down_proj' has shape \(8, 128, 32\).*expects \(8, 128, 64\)"):
        _load(good_dir, shrink)


def test_config_pool_mismatch_is_named(good_dir):
    # the checkpoint has 2 pools, the config claims one global pool
    with pytest.raises(ValueError, match=r"'model\.pools\.1\.(gate_up|down)_proj' is not part of this model's layout.*1 pool\(s\)"):
        _load(good_dir, layers_per_pool=4)
    # the config claims 4 pools: pools 2 and 3 are missing
    with pytest.raises(ValueError, match=r"missing tensor\(s\) 'model\.pools\.2\.down_proj'"):
        _load(good_dir, layers_per_pool=1)


def test_non_finite_tensor_is_named(good_dir):
    def poison(t):
        t["model.layers.2.self_attn.o_proj.weight"][0, 0] = float("nan")

    with pytest.raises(ValueError, match=r"'model\.layers\.2\.self_attn\.o_proj\.weight' must hold finite"):
        _load(good_dir, poison)


@pytest.mark.engine
def test_engine_refuses_missing_tensor(good_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in good_dir.iterdir():
        if f.name != "model.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(good_dir / "model.safetensors"))
    del tensors["model.pools.0.down_proj"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    code = ("from vllm import LLM\n"
            f"LLM(model={str(broken)!r}, dtype='float32', enforce_eager=True, max_model_len=128)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    assert proc.returncode != 0
    assert "missing tensor(s) 'model.pools.0.down_proj'" in proc.stdout + proc.stderr
