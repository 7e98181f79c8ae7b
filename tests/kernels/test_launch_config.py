"""Launch configs: file naming, tuned-file lookup by nearest token bucket, default."""

from __future__ import annotations

import json

import pytest
import torch

from unipool_serve.kernels import launch_config
from unipool_serve.kernels.launch_config import MoELaunchConfig, config_file_name, default_config, get_config


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(launch_config, "_extra_dirs", [])
    launch_config.use_config_dir(tmp_path)
    yield tmp_path
    launch_config.load_tuned_configs.cache_clear()


def test_file_name_matches_the_documented_scheme():
    name = config_file_name(192, 1024, 4096, 1, torch.bfloat16, "NVIDIA_H100_80GB_HBM3")
    assert name == "E=192,H=1024,F=4096,k=1,dtype=bfloat16,device=NVIDIA_H100_80GB_HBM3.json"


def test_tuned_file_wins_and_nearest_bucket_is_used(config_dir):
    small = MoELaunchConfig(16, 64, 128, 1, 4, 5)
    large = MoELaunchConfig(128, 128, 64, 8, 8, 3)
    name = config_file_name(96, 768, 3072, 1, torch.bfloat16, "GPU_X")
    (config_dir / name).write_text(json.dumps({"1": small.to_json(), "1024": large.to_json()}))
    assert get_config(1, 96, 768, 3072, 1, torch.bfloat16, device="GPU_X") == small
    assert get_config(300, 96, 768, 3072, 1, torch.bfloat16, device="GPU_X") == small
    assert get_config(700, 96, 768, 3072, 1, torch.bfloat16, device="GPU_X") == large
    assert get_config(16384, 96, 768, 3072, 1, torch.bfloat16, device="GPU_X") == large
    # Another device, dtype or shape falls back to the heuristic.
    assert get_config(1, 96, 768, 3072, 1, torch.bfloat16, device="GPU_Y") == default_config(
        1, 96, 768, 3072, 1, torch.bfloat16)
    assert get_config(1, 96, 768, 3072, 1, torch.float16, device="GPU_X") != small


def test_default_grows_tiles_with_rows_per_expert():
    decode = default_config(1, 192, 1024, 4096, 1, torch.bfloat16)
    prefill = default_config(16384, 192, 1024, 4096, 1, torch.bfloat16)
    assert decode.BLOCK_M == 16 and prefill.BLOCK_M > decode.BLOCK_M


@pytest.mark.parametrize("bad", [dict(BLOCK_M=8), dict(BLOCK_N=48), dict(num_stages=0)])
def test_invalid_config_names_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
        MoELaunchConfig(**bad)


@pytest.mark.parametrize("shape", [(192, 1024, 4096, 1), (96, 768, 3072, 1), (384, 768, 768, 4)])
def test_small_t_path_fills_the_sms_then_hands_over(shape):
    E, H, F, k = shape
    num_sms = 132
    previous = None
    for T in (1, 2, 4, 8, 16, 32, 64, 128, 512, 4096):
        config = default_config(T, E, H, F, k, torch.bfloat16, num_sms=num_sms)
        touched = min(E, T * k)
        down_programs = touched * -(-H // config.BLOCK_N) * config.SPLIT_K
        if T * k <= 2:  # one or two experts: never fewer programs than SMs
            assert down_programs >= num_sms and config.SPLIT_K > 1 or F < 4 * 2 * config.BLOCK_K
        if config.SPLIT_K > 1:  # split only while the program count stays within 2 per SM
            assert down_programs <= 2 * num_sms and F >= config.SPLIT_K * 2 * config.BLOCK_K
        if previous is not None:  # the split shrinks as T grows
            assert config.SPLIT_K <= previous.SPLIT_K
        previous = config
    assert previous.SPLIT_K == 1


def test_469m_decode_defaults():
    one = default_config(1, 192, 1024, 4096, 1, torch.bfloat16, num_sms=132)
    assert (one.BLOCK_N, one.SPLIT_K) == (32, 8)  # 32 column blocks x 8 K ranges = 256 programs
    assert default_config(32, 192, 1024, 4096, 1, torch.bfloat16, num_sms=132) == MoELaunchConfig(16, 64, 64, 1, 4, 4)


def test_old_tuned_files_without_split_k_still_load(config_dir):
    name = config_file_name(8, 64, 128, 1, torch.float16, "GPU_X")
    old = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}
    (config_dir / name).write_text(json.dumps({"4": old}))
    assert get_config(4, 8, 64, 128, 1, torch.float16, device="GPU_X").SPLIT_K == 1


@pytest.mark.parametrize("split_k", [0, 17])
def test_split_k_range_is_checked(split_k):
    with pytest.raises(ValueError, match="SPLIT_K"):
        MoELaunchConfig(SPLIT_K=split_k)
