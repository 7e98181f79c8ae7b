"""unipool-convert megatron: real megatron-core checkpoints, synthetic layouts, errors, safety.

Real checkpoints (tests/megatron_checkpoints.py: megatron-core 0.16 on CPU, gloo ranks) are
converted and the reference model's logits must equal Megatron's own forward on the same
tokens. Layouts megatron-core cannot build on CPU (Transformer Engine grouped GEMM) are
synthesised from a real checkpoint by renaming its tensors, so Megatron's logits still apply.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_checkpoints import ITERATION, write_checkpoint, write_gpt2_files
from unipool_serve.tools.convert import cli
from unipool_serve.tools.convert.errors import ConversionError
from unipool_serve.tools.convert.megatron import convert_megatron
from unipool_serve.tools.convert.megatron_args import read_run
from unipool_serve.tools.convert.safe_load import PickledStandIn, load_rank_file

ATOL = 1e-5  # fp32 on both sides; measured differences are ~1e-6
REAL = {  # name -> write_checkpoint spec; every layout and split megatron-core builds on CPU
    "tp2_hyper_norm": dict(tp=2),
    "ep2_grouped_pools_softmax_shared_tied": dict(ep=2, pool_size=2, router="softmax", topk=2, shared_expert=32,
                                                  untie=False),
    "tp2_ep2_legacy_grouped_vanilla_sigmoid": dict(tp=2, ep=2, layout="legacy_grouped", pool="none",
                                                   router="sigmoid", topk=2),
}


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    return write_gpt2_files(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """name -> (checkpoint folder, spec); each built once, on first use."""
    built = {}

    def get(name):
        if name not in built:
            folder = tmp_path_factory.mktemp(name)
            built[name] = (folder, write_checkpoint(folder, **REAL[name]))
        return built[name]

    return get


def convert(ckpt, out, gpt2_files, **kwargs):
    return convert_megatron(ckpt, out, progress=False, **{**gpt2_files, **kwargs})


@torch.no_grad()
def reference_logits(folder: Path, tokens) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from unipool_serve.model_executor.reference.hf_registration import register_hf

    register_hf()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return [model(torch.tensor([ids])).logits[0] for ids in tokens]


def assert_matches_megatron(out: Path, ckpt: Path, spec: dict, atol: float = ATOL) -> None:
    expected = torch.load(ckpt / "megatron_logits.pt")
    for got, want in zip(reference_logits(out, spec["tokens"]), expected):
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= atol


def copy_checkpoint(ckpt: Path, dest: Path) -> Path:
    shutil.copytree(ckpt, dest, ignore=shutil.ignore_patterns("megatron_logits.pt"))
    return dest


def rewrite_rank_file(path: Path, edit) -> None:
    # weights_only=False is safe here: this test wrote the file itself a moment ago.
    data = torch.load(path, weights_only=False)
    edit(data)
    torch.save(data, path)


# ---- real megatron-core checkpoints -------------------------------------------------------


@pytest.mark.parametrize("name", list(REAL))
def test_real_checkpoint_matches_megatron_forward(name, real, gpt2_files, tmp_path):
    ckpt, spec = real(name)
    report = convert(ckpt, tmp_path / "out", gpt2_files)
    assert_matches_megatron(tmp_path / "out", ckpt, spec)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    per_pool = {"hyper": spec["layers"] if spec["pool_size"] <= 1 else spec["pool_size"], "none": 1}[spec["pool"]]
    assert config["layers_per_pool"] == per_pool and config["num_experts"] == spec["experts"]
    assert config["tie_word_embeddings"] == (not spec["untie"])
    assert report.tp_size == spec["tp"] and report.ep_size == spec["ep"]
    assert report.expert_layout == spec["layout"]


def test_hyper_pool_is_written_once_from_shared_storage(real, gpt2_files, tmp_path):
    ckpt, spec = real("tp2_hyper_norm")
    state = load_rank_file(ckpt / f"iter_{ITERATION:07d}" / "mp_rank_01" / "model_optim_rng.pt")["model"]
    key = "decoder.layers.{}.mlp.experts.local_experts.0.linear_fc1.weight"
    assert state[key.format(3)].untyped_storage().data_ptr() == state[key.format(0)].untyped_storage().data_ptr()
    convert(ckpt, tmp_path / "out", gpt2_files)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert sorted(n for n in names if n.startswith("model.pools.")) == ["model.pools.0.down_proj",
                                                                            "model.pools.0.gate_up_proj"]
        assert f.get_tensor("model.pools.0.gate_up_proj").shape == (spec["experts"], 2 * spec["ffn"], spec["hidden"])
        assert f.get_tensor("model.routers.0.weight").dtype == torch.float32


def test_norm_router_scale_and_constant_are_the_runs(real, gpt2_files, tmp_path):
    ckpt, spec = real("tp2_hyper_norm")
    report = convert(ckpt, tmp_path / "out", gpt2_files)
    assert report.config.norm_router_c == spec["norm_c"]
    state = load_rank_file(ckpt / f"iter_{ITERATION:07d}" / "mp_rank_00" / "model_optim_rng.pt")["model"]
    from safetensors.torch import load_file

    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for l in range(spec["layers"]):
        assert torch.equal(out[f"model.routers.{l}.norm_scale"], state[f"decoder.layers.{l}.mlp.router.norm_scale"])
        assert out[f"model.routers.{l}.norm_scale"].item() != 1.0  # the writer draws them, so they are exercised


def _as_te_grouped(state: dict) -> None:
    """Transformer Engine spec names: experts.linear_fc{1,2}.weight{j}; input norm fused into linear_qkv."""
    for key in [k for k in state if ".mlp.experts.local_experts." in k]:
        value = state.pop(key)
        prefix, rest = key.split(".mlp.experts.local_experts.")
        j, tail = rest.split(".", 1)  # "linear_fc1.weight" or "linear_fc1._extra_state"
        module, attr = tail.split(".")
        if attr == "weight":
            state[f"{prefix}.mlp.experts.{module}.weight{j}"] = value
        else:
            state[f"{prefix}.mlp.experts.{module}._extra_state"] = torch.zeros(0, dtype=torch.uint8)
    for key in [k for k in state if k.endswith(".input_layernorm.weight")]:
        state[key.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")] = state.pop(key)
    state["output_layer._extra_state"] = io.BytesIO(b"fp8 metadata")  # older TE pickles BytesIO


def test_te_grouped_gemm_layout_synthetic(real, gpt2_files, tmp_path):
    # megatron-core cannot build TEGroupedMLP without Transformer Engine (CUDA): the same real
    # weights are saved under TE's names, so Megatron's logits remain the ground truth.
    ckpt, spec = real("tp2_hyper_norm")
    copy = copy_checkpoint(ckpt, tmp_path / "te")
    for rank in ("mp_rank_00", "mp_rank_01"):
        rewrite_rank_file(copy / f"iter_{ITERATION:07d}" / rank / "model_optim_rng.pt", lambda d: _as_te_grouped(d["model"]))
    report = convert(copy, tmp_path / "out", gpt2_files)
    assert report.expert_layout == "te_grouped"
    assert_matches_megatron(tmp_path / "out", ckpt, spec)


def test_bf16_checkpoint_keeps_its_dtype_and_fp32_routers(real, gpt2_files, tmp_path):
    ckpt, spec = real("tp2_hyper_norm")
    copy = copy_checkpoint(ckpt, tmp_path / "bf16")
    for rank in ("mp_rank_00", "mp_rank_01"):
        rewrite_rank_file(copy / f"iter_{ITERATION:07d}" / rank / "model_optim_rng.pt", lambda d: d.update(
            model={k: v.bfloat16() if isinstance(v, torch.Tensor) else v for k, v in d["model"].items()}))
    from safetensors.torch import load_file

    convert(copy, tmp_path / "auto", gpt2_files)
    auto = load_file(str(tmp_path / "auto" / "model.safetensors"))
    assert auto["model.pools.0.gate_up_proj"].dtype == torch.bfloat16
    assert auto["model.routers.0.weight"].dtype == auto["model.routers.0.norm_scale"].dtype == torch.float32
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["dtype"] == "bfloat16"
    convert(copy, tmp_path / "fp32", gpt2_files, dtype="float32")
    fp32 = load_file(str(tmp_path / "fp32" / "model.safetensors"))
    assert torch.equal(fp32["model.pools.0.gate_up_proj"], auto["model.pools.0.gate_up_proj"].float())


def test_sharded_output_loads_the_same(real, gpt2_files, tmp_path):
    ckpt, spec = real("tp2_hyper_norm")
    convert(ckpt, tmp_path / "out", gpt2_files, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((tmp_path / "out" / f).exists() for f in files)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert_matches_megatron(tmp_path / "out", ckpt, spec)


def test_pools_are_streamed_one_expert_at_a_time(real, gpt2_files, tmp_path, monkeypatch):
    from unipool_serve.tools.convert import output_folder

    ckpt, spec = real("tp2_hyper_norm")
    largest = {}
    original = output_folder._write_one

    def spy(path, tensors, dtypes, bar):
        for t in tensors:
            largest[t.name] = max(p.numel() for p in t.pieces())
        return original(path, tensors, dtypes, bar)

    monkeypatch.setattr(output_folder, "_write_one", spy)
    convert(ckpt, tmp_path / "out", gpt2_files)
    assert largest["model.pools.0.gate_up_proj"] == 2 * spec["ffn"] * spec["hidden"]  # one expert, not E
    assert largest["model.pools.0.down_proj"] == spec["hidden"] * spec["ffn"]


# ---- errors: one line naming the field, exit code 2, nothing written --------------------


def _rank(copy: Path, name: str = "mp_rank_00") -> Path:
    return copy / f"iter_{ITERATION:07d}" / name / "model_optim_rng.pt"


def _edit_all(copy: Path, edit) -> None:
    for path in sorted(copy.glob(f"iter_{ITERATION:07d}/mp_rank_*/model_optim_rng.pt")):
        rewrite_rank_file(path, edit)


def _perturb_layer2_expert(data):
    key = "decoder.layers.2.mlp.experts.local_experts.1.linear_fc1.weight"
    data["model"][key] = data["model"][key].clone() + 0.01  # its own storage, other values


def _as_torch_dist(copy: Path) -> None:
    for rank in copy.glob("iter_*/mp_rank_*"):
        shutil.rmtree(rank)
    (copy / f"iter_{ITERATION:07d}" / ".metadata").write_text("{}")
    (copy / f"iter_{ITERATION:07d}" / "__0_0.distcp").write_bytes(b"")


class _RunsCode:  # what a malicious pickle does: call os.system when loaded
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


ERROR_CASES = {
    "rank file missing": (lambda c: _rank(c, "mp_rank_01").unlink(), "mp_rank_01/model_optim_rng.pt is missing"),
    "pool copies differ": (lambda c: _edit_all(c, _perturb_layer2_expert),
                           "decoder.layers.2.mlp.experts.local_experts.1.linear_fc1.weight differs from layer 0's copy"),
    "unknown pool mode": (lambda c: _edit_all(c, lambda d: setattr(d["args"], "moe_expert_pool_mode", "bogus")),
                          "args.moe_expert_pool_mode='bogus' is unknown"),
    "masked pool mode": (lambda c: _edit_all(c, lambda d: setattr(d["args"], "moe_expert_pool_mode", "sliding")),
                         "args.moe_expert_pool_mode='sliding' is not supported"),
    "missing arg": (lambda c: _edit_all(c, lambda d: delattr(d["args"], "num_layers")), "args have no num_layers"),
    "unsupported feature": (lambda c: _edit_all(c, lambda d: setattr(d["args"], "qk_layernorm", True)),
                            "args.qk_layernorm=True is not supported"),
    "shapes do not add up": (lambda c: _edit_all(c, lambda d: setattr(d["args"], "num_query_groups", 4)),
                             "self_attention.linear_qkv.weight has shape"),
    "unmapped tensor": (lambda c: _edit_all(c, lambda d: d["model"].update(
        {"decoder.layers.0.mlp.router.expert_bias": torch.zeros(4)})), "unexpected decoder.layers.0.mlp.router.expert_bias"),
    "ranks from different runs": (lambda c: rewrite_rank_file(_rank(c, "mp_rank_01"), lambda d: d["model"][
        "decoder.final_layernorm.weight"].mul_(2)), "decoder.final_layernorm.weight differs between mp_rank_00 and mp_rank_01"),
    "no expert tensors": (lambda c: _edit_all(c, lambda d: d.update(model={
        k: v for k, v in d["model"].items() if ".experts." not in k})), "no expert tensors found"),
    "distributed format": (lambda c: _as_torch_dist(c), "is a torch_dist (distributed) checkpoint"),
    "iteration absent": (lambda c: (c / "latest_checkpointed_iteration.txt").write_text("9"),
                         "iter_0000009 does not exist (iterations in"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_checkpoints_fail_with_one_line_and_write_nothing(case, real, gpt2_files, tmp_path, capsys):
    ckpt, _ = real("tp2_hyper_norm")
    copy = copy_checkpoint(ckpt, tmp_path / "ckpt")
    setup, message = ERROR_CASES[case]
    setup(copy)
    out = tmp_path / "out"
    rc = cli.main(["megatron", str(copy), str(out), "--vocab-file", str(gpt2_files["vocab_file"]),
                   "--merge-file", str(gpt2_files["merge_file"]), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("unipool-convert: error: ")
    assert message in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_trust_pool_leader_takes_the_first_layers_copy(real, gpt2_files, tmp_path):
    ckpt, spec = real("tp2_hyper_norm")
    copy = copy_checkpoint(ckpt, tmp_path / "ckpt")
    _edit_all(copy, _perturb_layer2_expert)
    report = convert(copy, tmp_path / "out", gpt2_files, trust_pool_leader=True)
    assert any("--trust-pool-leader" in note for note in report.notes)
    assert_matches_megatron(tmp_path / "out", ckpt, spec)  # layer 0's (unchanged) experts were used


def test_unsafe_pickle_is_refused_and_never_runs(real, gpt2_files, tmp_path):
    ckpt, _ = real("tp2_hyper_norm")
    copy = copy_checkpoint(ckpt, tmp_path / "ckpt")
    marker = tmp_path / "code-ran"
    rewrite_rank_file(_rank(copy), lambda d: d.update(payload=_RunsCode(marker)))
    with pytest.raises(ConversionError, match=r"refusing to unpickle (posix|os)\.system"):
        convert(copy, tmp_path / "out", gpt2_files)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_every_load_is_weights_only_and_memory_mapped(real, gpt2_files, tmp_path, monkeypatch):
    ckpt, _ = real("tp2_hyper_norm")
    calls = []
    original = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    convert(ckpt, tmp_path / "out", gpt2_files)
    assert calls and all(c.get("weights_only") is True and c.get("mmap") is True for c in calls)


def test_failure_while_writing_leaves_no_folder(real, gpt2_files, tmp_path, monkeypatch):
    from unipool_serve.tools.convert.megatron_tensors import MegatronTensors

    ckpt, _ = real("tp2_hyper_norm")

    def broken(self, leader):
        yield from ()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MegatronTensors, "_pool_down", broken)
    with pytest.raises(OSError):
        convert(ckpt, tmp_path / "out", gpt2_files)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_existing_output_folder_is_left_alone(real, gpt2_files, tmp_path):
    ckpt, _ = real("tp2_hyper_norm")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists and is not an empty folder"):
        convert(ckpt, tmp_path / "out", gpt2_files)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


# ---- args -> config, without files ----------------------------------------------------


def _args(**overrides) -> argparse.Namespace:
    base = dict(num_layers=12, hidden_size=768, num_attention_heads=12, group_query_attention=True,
                num_query_groups=4, kv_channels=None, ffn_hidden_size=3072, padded_vocab_size=51200,
                max_position_embeddings=1024, position_embedding_type="rope", rotary_base=1000000,
                normalization="RMSNorm", norm_epsilon=1e-5, swiglu=True, add_bias_linear=False,
                untie_embeddings_and_output_weights=True, num_experts=96, moe_router_topk=1,
                moe_expert_pool_mode="hyper", moe_expert_pool_size=1, moe_norm_routing=True,
                moe_norm_routing_eps=1e-8, moe_norm_routing_init_method="monte_carlo")
    return argparse.Namespace(**{**base, **overrides})


@pytest.mark.parametrize("overrides, expected", [
    ({}, dict(layers_per_pool=12, num_experts=96, router_type="norm", norm_router_c=4.016194122308835)),
    (dict(moe_expert_pool_size=3), dict(layers_per_pool=3)),
    (dict(moe_expert_pool_mode="shared", moe_expert_pool_size=2, num_experts=16), dict(layers_per_pool=2, num_experts=16)),
    (dict(moe_expert_pool_mode="none", num_experts=8), dict(layers_per_pool=1)),
    (dict(moe_expert_pool_mode=None, num_experts=8), dict(layers_per_pool=1)),  # stock megatron-core
    (dict(moe_norm_routing_init_method="one"), dict(norm_router_c=1.0)),
    (dict(moe_norm_routing=False, moe_router_pre_softmax=True), dict(router_type="softmax", norm_topk_prob=False)),
    (dict(moe_norm_routing=False), dict(router_type="softmax", norm_topk_prob=True)),
    (dict(moe_norm_routing=False, moe_router_score_function="sigmoid"), dict(router_type="sigmoid", norm_topk_prob=False)),
    (dict(moe_norm_routing=False, moe_router_score_function="sigmoid", moe_router_topk=2),
     dict(router_type="sigmoid", norm_topk_prob=True)),
    (dict(), dict(num_key_value_heads=4, head_dim=64, tie_word_embeddings=False, vocab_size=51200,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
])
def test_args_map_to_config(overrides, expected):
    config = read_run(_args(**overrides)).config
    for key, value in expected.items():
        assert config[key] == value, key


@pytest.mark.parametrize("overrides, message", [
    (dict(moe_expert_pool_mode="global"), "moe_expert_pool_mode='global' is not supported"),
    (dict(moe_expert_pool_size=5), "moe_expert_pool_size=5 does not divide num_layers=12"),
    (dict(moe_norm_routing_eps=1e-6), "moe_norm_routing_eps=1e-06: only 1e-08"),
    (dict(moe_router_enable_expert_bias=True), "moe_router_enable_expert_bias=True is not supported"),
    (dict(position_embedding_type="learned_absolute"), "position_embedding_type='learned_absolute'"),
    (dict(num_experts=None), "num_experts is unset"),
    (dict(pipeline_model_parallel_size=2), None),  # read_run accepts it; the rank grid refuses it
    (dict(expert_tensor_parallel_size=1, tensor_model_parallel_size=2), "expert_tensor_parallel_size=1 differs"),
    (dict(tensor_model_parallel_size=8), "num_attention_heads=12 is not divisible by its parallel size 8"),
])
def test_unsupported_args_are_named(overrides, message):
    if message is None:
        assert read_run(_args(**overrides)).pp_size == 2
        return
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_run(_args(**overrides))


def test_pipeline_parallel_checkpoints_are_refused(tmp_path):
    from unipool_serve.tools.convert.megatron_files import rank_grid

    with pytest.raises(ConversionError, match="pipeline_model_parallel_size=2"):
        rank_grid(tmp_path, 1, 2, 1)


# ---- safe loading, tokenizer, command line ----------------------------------------------


def test_megatron_types_load_as_inert_stand_ins(tmp_path):
    import random

    import numpy as np
    from megatron.core.transformer.enums import AttnBackend

    path = tmp_path / "rank.pt"
    torch.save({"args": argparse.Namespace(attention_backend=AttnBackend.flash, params_dtype=torch.bfloat16),
                "model": {"w": torch.ones(2)}, "rng_state": [{"np_rng_state": np.random.get_state(),
                                                              "random_rng_state": random.getstate()}]}, path)
    loaded = load_rank_file(path)  # importing megatron.core above registered its real classes: ignored
    backend = loaded["args"].attention_backend
    assert isinstance(backend, PickledStandIn) and backend.value == AttnBackend.flash.value
    assert type(backend).__module__ != "megatron.core.transformer.enums"  # never the real class
    assert loaded["args"].params_dtype is torch.bfloat16 and torch.equal(loaded["model"]["w"], torch.ones(2))


def test_gpt2_tokenizer_matches_the_reference_bpe(gpt2_files, tmp_path):
    from transformers import GPT2Tokenizer

    from unipool_serve.tools.convert.tokenizer_files import gpt2_bpe

    ours = gpt2_bpe(gpt2_files["vocab_file"], gpt2_files["merge_file"], 256)
    slow = GPT2Tokenizer(str(gpt2_files["vocab_file"]), str(gpt2_files["merge_file"]))  # OpenAI's algorithm
    for text in ("The quick  brown fox, jumps!", "def f(x):\n    return x*2\n", "héllo wörld 123<|endoftext|>"):
        assert ours.encode(text) == slow.encode(text)
        assert ours.decode(ours.encode(text)) == text
    assert ours.eos_token == "<|endoftext|>" and ours.eos_token_id == slow.convert_tokens_to_ids("<|endoftext|>")
    vocab = json.loads(gpt2_files["vocab_file"].read_text())
    del vocab["<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ConversionError, match="has no <\\|endoftext\\|> entry"):
        gpt2_bpe(tmp_path / "vocab.json", gpt2_files["merge_file"], 256)


def test_no_tokenizer_is_an_error_naming_the_flags(real, tmp_path):
    ckpt, _ = real("tp2_hyper_norm")
    with pytest.raises(ConversionError, match="no tokenizer: pass --vocab-file and --merge-file"):
        convert_megatron(ckpt, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_installed_command_reports_bad_input_in_one_line(tmp_path):
    exe = Path(sys.executable).parent / "unipool-convert"
    done = subprocess.run([str(exe), "megatron", str(tmp_path / "nowhere"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"unipool-convert: error: CKPT_DIR {tmp_path / 'nowhere'} is not a folder: pass Megatron's --save folder "
        "or one of its iter_XXXXXXX folders"]
    usage = subprocess.run([str(exe), "megatron", "--dtype", "int8", "a", "b"], capture_output=True, text=True, timeout=600)
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1 and "--dtype" in usage.stderr
