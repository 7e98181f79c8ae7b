"""Pruning pools to their most used experts, and sub-pool profiles of the same experts."""

from __future__ import annotations

import json

import pytest
import torch

from unipool_serve.demo.tiny_model import tiny_config, write_tiny_model
from unipool_serve.model_executor.config import UniPoolConfig
from unipool_serve.tools.convert.cli import main as convert_main
from unipool_serve.tools.convert.errors import ConversionError
from unipool_serve.tools.convert.prune import kept_experts, prune_model
from unipool_serve.model_executor.reference.hf_registration import register_hf
from unipool_serve.tools.steering_cli import main as steering_main
from unipool_serve.model_executor.steering.profile import SteeringProfile


def test_each_pool_keeps_its_most_used_experts_and_pools_sharing_a_router_agree():
    config = tiny_config(num_hidden_layers=4, layers_per_pool=1, layers_per_router=2, num_experts=6,
                         num_experts_per_tok=2, router_type="softmax")
    usage = torch.tensor([[9, 0, 5, 1, 0, 0], [0, 0, 0, 0, 8, 7],
                          [1, 1, 1, 1, 1, 1], [0, 0, 0, 3, 0, 0]], dtype=torch.float64)
    kept = kept_experts(usage, config, 2)
    assert kept[0] == kept[1] == [0, 4]  # router 0 serves pools 0 and 1: ranked by their sum (9, 8)
    assert kept[2] == kept[3] == [0, 3]  # sums 1, 1, 1, 4, 1, 1: expert 3, then the lowest id
    with pytest.raises(ConversionError, match="at least top_k=2"):
        kept_experts(usage, config, 1)
    with pytest.raises(ConversionError, match="below the pool size 6"):
        kept_experts(usage, config, 6)


@pytest.mark.parametrize("router_type,norm_topk_prob", [("norm", False), ("softmax", False), ("sigmoid", True)])
def test_a_pruned_model_is_the_original_with_the_pruned_experts_excluded(tmp_path, router_type, norm_topk_prob):
    register_hf()
    from unipool_serve.model_executor.reference.model import UniPoolForCausalLM

    model_dir = write_tiny_model(tmp_path / "model", seed=4, router_type=router_type, norm_topk_prob=norm_topk_prob,
                                 num_experts=8, num_experts_per_tok=2)
    config = UniPoolConfig.from_pretrained(str(model_dir))
    usage = torch.tensor([[5, 1, 7, 0, 3, 9, 2, 4]], dtype=torch.float64)
    report = prune_model(model_dir, tmp_path / "pruned", 4, usage)
    assert report.kept == {0: [0, 2, 5, 7]} and report.coverage[0] == pytest.approx(25 / 31)
    pruned_config = UniPoolConfig.from_pretrained(str(tmp_path / "pruned"))
    assert pruned_config.num_experts == 4 and pruned_config.norm_router_c == config.norm_router_c
    original = UniPoolForCausalLM.from_pretrained(str(model_dir)).eval()
    pruned = UniPoolForCausalLM.from_pretrained(str(tmp_path / "pruned")).eval()
    ids = torch.randint(3, config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    sub_pool = torch.ones(1, config.num_hidden_layers, 8, dtype=torch.int8).neg()  # exclude everything...
    sub_pool[..., [0, 2, 5, 7]] = 0  # ...but the kept experts
    with torch.no_grad():
        want = original(input_ids=ids, steering_mask=sub_pool.expand(2, -1, -1)).logits
        got = pruned(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_profiles_are_carried_over_remapped_or_left_out_with_a_note(tmp_path):
    model_dir = write_tiny_model(tmp_path / "model", seed=1, num_experts=8, num_experts_per_tok=1)
    config = UniPoolConfig.from_pretrained(str(model_dir))
    (model_dir / "steering").mkdir()
    bias = torch.arange(config.num_hidden_layers * 8, dtype=torch.float32).view(config.num_hidden_layers, 8)
    SteeringProfile.for_config(config, name="ok", bias=bias, exclude={0: [1, 2]}).save(model_dir / "steering" / "ok.safetensors")
    SteeringProfile.for_config(config, name="bad", include={0: [1]}).save(model_dir / "steering" / "bad.safetensors")
    report = prune_model(model_dir, tmp_path / "pruned", 4, torch.tensor([[0, 0, 9, 8, 0, 7, 6, 0]], dtype=torch.float64))
    assert report.kept == {0: [2, 3, 5, 6]}
    pruned_config = UniPoolConfig.from_pretrained(str(tmp_path / "pruned"))
    carried = SteeringProfile.load(tmp_path / "pruned" / "steering" / "ok.safetensors", pruned_config)
    assert torch.equal(carried.bias[:, 0], bias[:, 2]) and carried.exclude == {0: [0]}  # old 2 is new 0; 1 pruned
    assert not (tmp_path / "pruned" / "steering" / "bad.safetensors").exists()
    assert any("bad.safetensors" in note and "pruned expert" in note for note in report.notes)


def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    model_dir = write_tiny_model(tmp_path / "model", seed=1, num_experts=8, num_experts_per_tok=2)
    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text(json.dumps({"prompt": "def add(a, b):"}) + "\n{not json\n")
    capsys.readouterr()  # the model writer's progress bars
    for argv, message in ((["--keep", "1", "--usage", str(calibration)], "at least top_k=2"),
                          (["--keep", "4", "--usage", str(calibration)], "calibration.jsonl:2: not JSON"),
                          (["--keep", "4", "--usage", str(tmp_path / "missing.jsonl")], "neither an http(s) URL"),
                          (["--keep-fraction", "1.5", "--usage", str(calibration)], "not a fraction")):
        assert convert_main(["prune", str(model_dir), str(tmp_path / "out"), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_subpool_profile_from_a_calibration_run_and_prune_agree(tmp_path, capsys):
    model_dir = write_tiny_model(tmp_path / "model", seed=2, num_experts=8, num_experts_per_tok=1)
    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text("\n".join(json.dumps({"prompt": p}) for p in
                                     ("def add(a, b):", "The quick brown fox", "import torch\nx = 1")) + "\n")
    out = tmp_path / "half.safetensors"
    capsys.readouterr()
    assert steering_main(["subpool", "--model", str(model_dir), "--usage", str(calibration), "--keep", "4",
                          "--name", "half", "--out", str(out)]) == 0
    assert convert_main(["prune", str(model_dir), str(tmp_path / "pruned"), "--keep", "4", "--usage", str(calibration)]) == 0
    config = UniPoolConfig.from_pretrained(str(model_dir))
    profile = SteeringProfile.load(out, config)
    kept = json.loads(capsys.readouterr().out.split("pool 0: kept ")[1].split(" (")[0])
    assert all(sorted(set(range(8)) - set(profile.exclude[l])) == kept for l in range(config.num_hidden_layers))
