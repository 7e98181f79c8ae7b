"""The shipped demo folder: complete, small, loadable, and consistent with the script that wrote it."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
EXPECTED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
                  "metadata.json", "training.json", "steering/prose.safetensors", "steering/code.safetensors")


def _script():
    spec = importlib.util.spec_from_file_location("train_demo_model", REPO / "scripts" / "train_demo_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", EXPECTED_FILES)
def test_file_present(demo_dir, name):
    assert (demo_dir / name).is_file(), name


def test_folder_is_small(demo_dir):
    size = sum(p.stat().st_size for p in demo_dir.rglob("*") if p.is_file())
    assert size < 25 * 2**20, size


def test_config_is_the_documented_shape(demo):
    model, tokenizer = demo
    cfg = model.config
    assert cfg.model_type == "unipool"
    assert (cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok) == (4, 16, 1)
    assert cfg.num_pools == 1 and cfg.router_type == "norm"
    assert cfg.head_dim == 64 and cfg.hidden_size % 32 == 0 and cfg.expert_intermediate_size % 32 == 0
    assert len(tokenizer) <= cfg.vocab_size
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    # one pool object shared by every layer
    pools = {id(layer.moe.pool) for layer in model.model.layers}
    assert len(pools) == 1


def test_loads_through_auto_classes(demo_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    from unipool_serve.model_executor.reference.hf_registration import register_hf

    register_hf()
    assert AutoConfig.from_pretrained(str(demo_dir)).model_type == "unipool"
    model = AutoModelForCausalLM.from_pretrained(str(demo_dir), dtype=torch.float32)
    assert type(model).__name__ == "UniPoolForCausalLM"


def test_weights_match_recorded_hash(demo_dir):
    meta = json.loads((demo_dir / "metadata.json").read_text())
    assert _script().weights_hash(demo_dir) == meta["weights_sha256"]


def test_prompts_match_the_ones_measured(demo_dir):
    """The fixed prompt sets are generated from the grammar; a grammar change would silently change them."""
    meta = json.loads((demo_dir / "metadata.json").read_text())
    assert _script().prompts_hash() == meta["prompts_sha256"]


def test_tokenizer_file_matches_training_record(demo_dir):
    training = json.loads((demo_dir / "training.json").read_text())
    assert hashlib.sha256((demo_dir / "tokenizer.json").read_bytes()).hexdigest() == training["tokenizer_sha256"]


def test_profiles_load_and_validate(demo, demo_profiles):
    from unipool_serve.model_executor.steering.profile import SteeringProfile

    model, _ = demo
    assert set(demo_profiles) == {"prose", "code"}
    for name, profile in demo_profiles.items():
        assert profile.name == name
        assert profile.description
        assert profile.alpha > 0
        assert tuple(profile.bias.shape) == (model.config.num_hidden_layers, model.config.num_experts)
        assert (profile.bias != 0).any()
        assert profile.bias.abs().max() <= 1.0
        profile.check_model(model.config)
        rows, mask = profile.bias_rows(), profile.mask_rows()
        assert rows.dtype == torch.float32 and mask.dtype == torch.int8
        # bias and exclusions point the same way: an excluded expert never gets a positive bias
        assert not ((mask == -1) & (profile.bias > 0)).any()
    # the two profiles steer in opposite directions
    assert torch.all(demo_profiles["prose"].bias * demo_profiles["code"].bias <= 0)


def test_metadata_records_the_measurements(demo_dir):
    meta = json.loads((demo_dir / "metadata.json").read_text())
    for key in ("classifier", "behaviour", "expert_load", "steering", "weights_sha256"):
        assert key in meta, key
    load = torch.tensor(meta["expert_load"]["pool"])
    assert load.shape == (16,)
    assert abs(float(load.sum()) - 1.0) < 1e-3
    readme = (demo_dir / "README.md").read_text()
    assert "Per-expert load" in readme and "random control" in readme
