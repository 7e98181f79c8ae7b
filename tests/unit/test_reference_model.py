"""The pure-PyTorch reference model: external ground truth, pool sharing, format, steering."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

from unipool_serve.kernels.moe_reference import pool_moe
from unipool_serve.model_executor.reference.hf_registration import register_hf
from unipool_serve.model_executor.reference.model import UniPoolForCausalLM
from unipool_serve.demo.tiny_model import tiny_config

register_hf()


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return UniPoolForCausalLM(tiny_config(**overrides)).eval()


def test_vanilla_layout_equals_transformers_mixtral():
    ours = _model(layers_per_pool=1, router_type="softmax", norm_topk_prob=True, num_experts_per_tok=2,
                  initializer_range=0.1)
    cfg = ours.config
    mixtral = MixtralForCausalLM(MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.expert_intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, num_local_experts=cfg.num_experts,
        num_experts_per_tok=2, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_parameters["rope_theta"],
        max_position_embeddings=cfg.max_position_embeddings, sliding_window=None, tie_word_embeddings=False,
    )).eval()
    state = {}
    for name, tensor in ours.state_dict().items():
        if name.startswith("model.pools."):
            p, what = name.split(".")[2], name.split(".")[3]
            state[f"model.layers.{p}.mlp.experts.{what}"] = tensor
        elif name.startswith("model.routers."):
            state[f"model.layers.{name.split('.')[2]}.mlp.gate.weight"] = tensor
        else:
            state[name] = tensor
    missing, unexpected = mixtral.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids).logits, mixtral(ids).logits
    assert a.abs().max() > 0.1  # a real signal, not all zeros
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_global_pool_is_one_storage_and_counted_once():
    layers, experts, hidden, width = 12, 96, 64, 32
    model = _model(num_hidden_layers=layers, num_experts=experts, hidden_size=hidden, num_attention_heads=1,
                   head_dim=64, expert_intermediate_size=width, vocab_size=384)
    pools = {layer.moe.pool.gate_up_proj.data_ptr() for layer in model.model.layers}
    assert len(pools) == 1
    assert {layer.moe.pool.down_proj.data_ptr() for layer in model.model.layers} == {model.model.pools[0].down_proj.data_ptr()}
    cfg = model.config
    attn = hidden * cfg.head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    per_layer = attn + 2 * hidden + experts * hidden  # attention, two norms, router
    routers_extra = layers  # one norm_scale per router
    pool = experts * 3 * hidden * width  # ONE pool: gate+up+down, not times 12
    closed_form = 2 * cfg.vocab_size * hidden + hidden + layers * per_layer + routers_extra + pool
    assert sum(p.numel() for p in model.parameters()) == closed_form
    assert len(dict(model.named_parameters(remove_duplicate=False))) == len(dict(model.named_parameters()))


def test_grouped_pools_and_pathmoe_share_as_configured():
    model = _model(num_hidden_layers=4, layers_per_pool=2, layers_per_router=2)
    layers = model.model.layers
    assert layers[0].moe.pool is layers[1].moe.pool is not layers[2].moe.pool
    assert layers[0].moe.router is layers[1].moe.router is not layers[2].moe.router
    assert len(model.model.pools) == 2 and len(model.model.routers) == 2


@pytest.mark.parametrize("tied", [False, True])
def test_save_and_load_round_trip(tmp_path, tied):
    model = _model(tie_word_embeddings=tied, shared_expert_intermediate_size=32)
    model.save_pretrained(tmp_path)
    names = set(load_file(tmp_path / "model.safetensors"))
    assert ("lm_head.weight" in names) is (not tied)
    assert {n for n in names if "pools" in n} == {"model.pools.0.gate_up_proj", "model.pools.0.down_proj"}
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "unipool"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is UniPoolForCausalLM
    ids = torch.arange(1, 12).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert loaded.model.routers[0].weight.dtype == torch.float32


def test_bf16_load_keeps_routers_fp32(tmp_path):
    _model().save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.model.pools[0].gate_up_proj.dtype == torch.bfloat16
    assert loaded.model.routers[0].weight.dtype == torch.float32


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("model.pools.0.down_proj"), "missing tensors: ['model.pools.0.down_proj']"),
        (lambda s: s.__setitem__("model.pools.1.down_proj", s["model.pools.0.down_proj"].clone()), "unexpected tensors: ['model.pools.1.down_proj']"),
        (lambda s: s.__setitem__("model.routers.0.weight", torch.zeros(9, 128)), "model.routers.0.weight"),
    ],
)
def test_bad_checkpoints_name_the_tensor(tmp_path, edit, message):
    _model().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    edit(state)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception) as err:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert message in str(err.value)


def test_pool_size_mismatch_between_config_and_checkpoint(tmp_path):
    _model().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_experts"] = 16
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception) as err:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert "model.pools.0.gate_up_proj" in str(err.value)


def test_steering_in_the_model_zero_bias_exclusion_and_batch_independence():
    model = _model(seed=3, initializer_range=0.1)
    cfg = model.config
    ids = torch.randint(3, 300, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(ids, output_router_logits=True)
        zero = model(ids, steering_bias=torch.zeros(3, cfg.num_hidden_layers, cfg.num_experts))
        torch.testing.assert_close(zero.logits, plain.logits, rtol=0, atol=0)

        # Exclude every layer's most used expert for sequence 1 only.
        mask = torch.zeros(3, cfg.num_hidden_layers, cfg.num_experts, dtype=torch.int8)
        for l, z in enumerate(plain["router_logits"]):
            mask[1, l, z.argmax(-1).bincount(minlength=cfg.num_experts).argmax()] = -1
        captured = []
        for layer in model.model.layers:
            layer.moe.experts_fn = lambda h, a, b, i, w, _c=captured, _f=layer.moe.experts_fn: (_c.append(i), _f(h, a, b, i, w))[1]
        steered = model(ids, steering_mask=mask)
        for l, chosen in enumerate(captured):
            per_seq = chosen.view(3, 9, -1)
            banned = mask[1, l].eq(-1).nonzero().flatten()
            assert not torch.isin(per_seq[1], banned).any()
        # Other sequences are untouched by sequence 1's profile.
        torch.testing.assert_close(steered.logits[[0, 2]], plain.logits[[0, 2]], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(steered.logits[1], plain.logits[1])

        # Per-token bias: a sequence steered alone equals the same sequence steered in a batch.
        bias = torch.randn(3, cfg.num_hidden_layers, cfg.num_experts) * 2
        model.set_experts_fn(pool_moe)  # drop the capturing wrapper
        batch = model(ids, steering_bias=bias).logits
        alone = model(ids[2:3], steering_bias=bias[2:3]).logits
        torch.testing.assert_close(alone[0], batch[2], rtol=1e-5, atol=1e-5)


def test_generate_with_a_per_sequence_profile():
    model = _model(seed=1, initializer_range=0.1)
    cfg = model.config
    ids = torch.tensor([[5, 17, 42, 8]])
    mask = torch.zeros(1, cfg.num_hidden_layers, cfg.num_experts, dtype=torch.int8)
    mask[..., :cfg.num_experts - 1] = -1  # force the last expert everywhere
    plain = model.generate(ids, max_new_tokens=8, do_sample=False)
    steered = model.generate(ids, max_new_tokens=8, do_sample=False, steering_mask=mask)
    assert plain.shape == steered.shape == (1, 12)
    assert not torch.equal(plain, steered)
