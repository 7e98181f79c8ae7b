import json
import math

import pytest
import torch

from unipool_serve.tools.steering_cli import main as steering_cli
from unipool_serve.model_executor.steering.profile import SteeringProfile, SteeringProfileError
from unipool_serve.demo.tiny_model import tiny_config

CFG = tiny_config()  # 4 layers, 8 experts, top-1


def _profile(**kw):
    return SteeringProfile.for_config(CFG, **{"name": "p", **kw})


def test_round_trip_and_engine_rows(tmp_path):
    bias = torch.randn(4, 8)
    p = _profile(bias=bias, alpha=0.5, include={1: [2]}, exclude={3: [0, 7]}, description="d")
    again = SteeringProfile.load(p.save(tmp_path / "p.safetensors"), CFG)
    assert again.name == "p" and again.description == "d" and again.alpha == 0.5
    torch.testing.assert_close(again.bias_rows(), 0.5 * bias)
    mask = again.mask_rows()
    assert mask[1, 2] == 1 and mask[3, 0] == -1 and mask[3, 7] == -1 and int(mask.abs().sum()) == 3
    assert again.content_hash() == p.content_hash()
    assert _profile(bias=bias, alpha=0.6).content_hash() != p.content_hash()
    assert again.summary()["layers"][3]["exclude"] == [0, 7]


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(name="../x"), "invalid profile name '../x'"),
        (dict(bias=torch.zeros(4, 9)), "bias has shape [4, 9], expected [4, 8]"),
        (dict(bias=torch.full((4, 8), math.nan)), "non-finite"),
        (dict(alpha=math.inf), "alpha must be a finite number"),
        (dict(exclude={0: [8]}), "exclude layer 0 names unknown experts [8]"),
        (dict(include={4: [1]}), "include names layer 4, model has 4"),
        (dict(include={0: [1]}, exclude={0: [1]}), "layer 0 both includes and excludes [1]"),
        (dict(include={0: [1, 2]}), "includes 2 experts, more than top_k=1"),
        (dict(exclude={0: list(range(8))}), "leaving fewer than top_k=1"),
        (dict(exclude={0: [1, 1]}), "repeated expert ids"),
    ],
)
def test_bad_profiles_are_rejected_with_the_reason(kw, message):
    with pytest.raises(SteeringProfileError) as err:
        _profile(**kw)
    assert message in str(err.value)


def test_profile_for_another_model_is_rejected(tmp_path):
    path = _profile().save(tmp_path / "p.safetensors")
    other = tiny_config(num_experts=16)
    with pytest.raises(SteeringProfileError, match="made for another model"):
        SteeringProfile.load(path, other)
    with pytest.raises(SteeringProfileError, match="made for another model"):
        SteeringProfile.load(path, tiny_config(layers_per_pool=2))  # same shapes, other layout


@pytest.mark.parametrize("data", [b"", b"garbage" * 10, b"\xff" * 8 + b"{}"])
def test_malformed_files_are_rejected(data):
    with pytest.raises(SteeringProfileError, match="not a valid safetensors file"):
        SteeringProfile.from_bytes(data)


def test_cli_creates_from_json_and_rejects_bad_input(tmp_path, capsys):
    CFG.save_pretrained(tmp_path)
    desc = {"name": "less-e3", "alpha": 2.0, "bias": {"1": {"3": -1.5}}, "exclude": {"0": [3]}}
    (tmp_path / "d.json").write_text(json.dumps(desc))
    out = tmp_path / "less-e3.safetensors"
    assert steering_cli(["create", "--model", str(tmp_path), "--json", str(tmp_path / "d.json"), "--out", str(out)]) == 0
    p = SteeringProfile.load(out, CFG)
    assert p.bias_rows()[1, 3] == -3.0 and p.exclude == {0: [3]}
    (tmp_path / "bad.json").write_text(json.dumps({"name": "x", "bias": {"9": {"0": 1}}}))
    assert steering_cli(["create", "--model", str(tmp_path), "--json", str(tmp_path / "bad.json"), "--out", str(tmp_path / "b")]) == 2
    assert "bias layer 9 out of range" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_provenance_round_trips_and_is_not_routing_content(tmp_path):
    made = {"method": "fit", "data_sha256": "ab" * 32, "lambda": 1e-4, "alpha": 2.0, "surrogate_accuracy": 0.9}
    p = _profile(bias=torch.ones(4, 8), provenance=made)
    again = SteeringProfile.load(p.save(tmp_path / "p.safetensors"), CFG)
    assert again.provenance == made and again.summary()["provenance"] == made
    assert again.content_hash() == _profile(bias=torch.ones(4, 8)).content_hash()


def test_profiles_without_provenance_still_load(tmp_path):
    """Files written before the entry existed carry no `provenance` metadata."""
    again = SteeringProfile.load(_profile().save(tmp_path / "p.safetensors"), CFG)
    assert again.provenance is None and again.summary()["provenance"] is None


@pytest.mark.parametrize("bad", [["a list"], {"x": math.nan}, {"x": object()}])
def test_provenance_must_be_a_json_object(bad):
    with pytest.raises(SteeringProfileError, match="provenance must be a JSON object"):
        _profile(provenance=bad)
