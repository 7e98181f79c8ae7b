"""unipool-serve refuses an inconsistent configuration before loading anything, with one line."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from unipool_serve.demo.tiny_model import tiny_config
from unipool_serve.model_executor.steering.profile import SteeringProfile
from unipool_serve.server import cli


def _ours(*argv: str) -> argparse.Namespace:
    return cli.our_parser().parse_known_args(list(argv))[0]


@pytest.fixture
def model(tmp_path) -> Path:
    folder = tmp_path / "model"
    (folder / "steering").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    SteeringProfile.for_config(tiny_config(), name="safe").save(folder / "steering" / "safe.safetensors")
    return folder


@pytest.mark.parametrize("argv,message", [
    (["--api-key", "kid=missing"], "binds steering profile 'missing'"),
    (["--api-key", "same", "--admin-key", "same"], "admin-key equals"),
    (["--admin-key", ""], "--admin-key is empty"),
    (["--api-key", "a,b"], "must not contain ','"),
    (["--api-key", "a", "--api-key", "a"], "given twice"),
    (["--steering-dir", "/no/such/folder"], "is not a folder"),
])
def test_inconsistent_flags_are_refused(model, argv, message):
    with pytest.raises(ValueError, match=message):
        cli.server_settings(_ours(*argv), model)


def test_an_unreadable_steering_dir_is_refused(model, monkeypatch):
    monkeypatch.setattr(cli.os, "access", lambda path, mode: False)  # these tests run as root: simulate it
    with pytest.raises(ValueError, match="cannot be read"):
        cli.server_settings(_ours(), model)


def test_a_consistent_configuration(model):
    settings = cli.server_settings(_ours("--api-key", "kid=safe", "--admin-key", "root"), model)
    assert settings.steering_dir == model / "steering" and settings.api_keys == ["kid=safe"]


def test_main_prints_one_line_and_exits_2(model, capsys):
    assert cli.main(["--model", str(model), "--api-key", "kid=missing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unipool-serve: ")


def test_cpu_kv_cache_is_sized_to_the_machine_unless_given(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    args = argparse.Namespace(kv_cache_memory_bytes=None)
    cli.size_cpu_kv_cache(args)
    assert cli.KV_CACHE_MIN <= args.kv_cache_memory_bytes <= cli.KV_CACHE_MAX
    given = argparse.Namespace(kv_cache_memory_bytes=123)
    cli.size_cpu_kv_cache(given)
    assert given.kv_cache_memory_bytes == 123
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    env_given = argparse.Namespace(kv_cache_memory_bytes=None)
    cli.size_cpu_kv_cache(env_given)
    assert env_given.kv_cache_memory_bytes is None
