import math

import pytest

from unipool_serve.model_executor.config import UniPoolConfig, norm_router_constant
from unipool_serve.demo.tiny_model import tiny_config


def test_norm_router_constant_is_the_training_codes_value():
    # docs/checkpoint-format.md quotes these. They are what UniPool's own NormRouter
    # initialisation computes (numpy RandomState(42), one randn(M) per sample); the
    # earlier torch-generator estimate gave 4.014086768340668 and 2.8244182956129835,
    # 0.05% and 0.12% off, which a model trained with that code must not be served with.
    assert norm_router_constant.__wrapped__(96, 1) == pytest.approx(4.016194122308835, rel=1e-12)
    assert norm_router_constant.__wrapped__(32, 1) == pytest.approx(2.827778015950584, rel=1e-12)
    # More experts chosen -> more score mass to spread -> smaller constant.
    assert norm_router_constant(32, 4) < norm_router_constant(32, 1)


def test_norm_router_constant_stays_finite_for_small_pools():
    # With 4 experts about 1 sample in 16 has no positive entry; the training code's
    # mean would be infinite. Those samples are skipped: c is finite, and above 1
    # since y has unit norm.
    c = norm_router_constant(4, 1)
    assert math.isfinite(c) and c > 1.0


def test_config_derives_c_and_maps():
    cfg = tiny_config(num_hidden_layers=8, layers_per_pool=4, layers_per_router=2)
    assert cfg.num_pools == 2 and cfg.num_routers == 4
    assert [cfg.layer_to_pool(l) for l in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [cfg.layer_to_router(l) for l in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert cfg.norm_router_c == pytest.approx(norm_router_constant(cfg.num_experts, 1))
    assert tiny_config().layers_per_pool == 4  # default: one global pool


def test_config_round_trip(tmp_path):
    cfg = tiny_config(router_type="softmax", norm_topk_prob=True, num_experts_per_tok=2, shared_expert_intermediate_size=32)
    cfg.save_pretrained(tmp_path)
    again = UniPoolConfig.from_pretrained(tmp_path)
    for key in ("router_type", "norm_topk_prob", "num_experts_per_tok", "shared_expert_intermediate_size",
                "layers_per_pool", "rope_parameters", "head_dim"):
        assert getattr(again, key) == getattr(cfg, key), key
    assert again.fingerprint() == cfg.fingerprint()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(layers_per_pool=3), "layers_per_pool=3 must divide num_hidden_layers=4; allowed values: [1, 2, 4]"),
        (dict(layers_per_router=0), "layers_per_router must be a positive integer"),
        (dict(router_type="topk"), "router_type='topk' is not one of ['norm', 'softmax', 'sigmoid']"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok=9 exceeds num_experts=8"),
        (dict(num_attention_heads=3, num_key_value_heads=2), "must be a multiple of num_key_value_heads"),
        (dict(router_type="norm", norm_topk_prob=True), "norm_topk_prob=True is not defined for router_type='norm'"),
        (dict(shared_expert_intermediate_size=-1), "shared_expert_intermediate_size must be an integer >= 0"),
        (dict(num_experts=2.5), "num_experts must be a positive integer"),
        (dict(hidden_act="gelu"), "only 'silu'"),
    ],
)
def test_bad_configs_name_the_field(overrides, message):
    with pytest.raises(ValueError) as err:
        tiny_config(**overrides)
    assert message in str(err.value)
