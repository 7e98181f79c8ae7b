"""fused_route == routing_reference.route_with_table: ids exactly, weights to fp32 rounding."""

from __future__ import annotations

import zlib

import pytest
import torch
from kernel_checks import DEVICE, steering_tables

from unipool_serve.kernels.routing import fused_route
from unipool_serve.kernels.routing_reference import route_with_table
from unipool_serve.kernels.routing_spec import RoutingSpec, SteeringView

# (router_type, renormalize, norm_scale as a device tensor)
ROUTERS = [
    ("norm", False, False),
    ("norm", False, True),
    ("softmax", False, False),
    ("softmax", True, False),
    ("sigmoid", False, False),
    ("sigmoid", True, False),
]
# (T, E, k): every T in {1, 7, 64, 300}, E in {1, 8, 96}, k in {1, 2, 4} appears.
SHAPES = [(1, 1, 1), (7, 8, 2), (64, 96, 4), (300, 8, 4), (300, 96, 1), (7, 96, 2)]


def _poisoned_out(num_tokens: int, top_k: int):
    ids = torch.full((num_tokens, top_k), -7, dtype=torch.int32, device=DEVICE)
    weights = torch.full((num_tokens, top_k), float("nan"), device=DEVICE)
    return ids, weights


def _check(logits, steer, bias, mask, layer, top_k, router_type, *, renormalize=False, norm_scale=1.0,
           norm_c=1.0, budget=None):
    spec = RoutingSpec.of(router_type, top_k, renormalize=renormalize, norm_c=norm_c)
    out = _poisoned_out(logits.shape[0], top_k)
    steering = None if steer is None else SteeringView(steer, bias, mask, budget)
    ids, weights = fused_route(logits, steering, layer, spec, norm_scale, out=out)
    assert ids.data_ptr() == out[0].data_ptr() and weights.data_ptr() == out[1].data_ptr()
    ref_scale = norm_scale.cpu() if isinstance(norm_scale, torch.Tensor) else norm_scale
    ref_steering = None if steer is None else SteeringView(steer.cpu(), bias.cpu(), mask.cpu(),
                                                           None if budget is None else budget.cpu())
    ref_ids, ref_w = route_with_table(logits.cpu(), ref_steering, layer, spec, ref_scale)
    torch.testing.assert_close(ids.cpu(), ref_ids, rtol=0, atol=0)
    torch.testing.assert_close(weights.cpu(), ref_w, rtol=1e-5, atol=1e-6, equal_nan=True)
    return ids, weights


def _inputs(num_tokens, num_experts, seed, *, profiles=5, layers=3, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = (2.0 * torch.randn(num_tokens, num_experts, generator=gen)).to(dtype).to(DEVICE)
    bias, mask = steering_tables(profiles, layers, num_experts, gen)
    steer = torch.randint(0, profiles + 1, (num_tokens,), generator=gen, dtype=torch.int32).to(DEVICE)
    return logits, steer, bias, mask


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T%d-E%d-k%d" % s)
@pytest.mark.parametrize("router_type,renormalize,scale_tensor", ROUTERS)
def test_matches_reference(shape, router_type, renormalize, scale_tensor):
    num_tokens, num_experts, top_k = shape
    seed = zlib.crc32(repr((shape, router_type, renormalize, scale_tensor)).encode())  # fresh inputs per case
    logits, steer, bias, mask = _inputs(num_tokens, num_experts, seed)
    scale = torch.tensor([1.7], device=DEVICE) if scale_tensor else 1.7
    _check(logits, steer, bias, mask, 2, top_k, router_type,
           renormalize=renormalize, norm_scale=scale, norm_c=0.8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits(dtype):
    logits, steer, bias, mask = _inputs(64, 96, seed=11, dtype=dtype)
    _check(logits, steer, bias, mask, 1, 2, "softmax", renormalize=True)


@pytest.mark.parametrize("num_experts", [512, 1000])
def test_large_pools(num_experts):
    logits, steer, bias, mask = _inputs(9, num_experts, seed=num_experts)
    _check(logits, steer, bias, mask, 0, 4, "norm", norm_scale=2.0)


@pytest.mark.parametrize("router_type", ["norm", "softmax", "sigmoid"])
def test_ties_go_to_the_lower_expert_id(router_type):
    # Logits on a coarse grid tie often; includes tie with each other at the ceiling.
    gen = torch.Generator().manual_seed(3)
    num_tokens, num_experts = 64, 8
    logits = torch.randint(-2, 3, (num_tokens, num_experts), generator=gen).float().to(DEVICE)
    bias = torch.zeros(3, 1, num_experts, device=DEVICE)
    mask = torch.zeros(3, 1, num_experts, dtype=torch.int8, device=DEVICE)
    mask[1, 0, [1, 4, 6]] = 1  # three includes tie at the ceiling
    mask[2, 0, [0, 2]] = -1
    steer = torch.randint(0, 3, (num_tokens,), generator=gen, dtype=torch.int32).to(DEVICE)
    ids, _ = _check(logits, steer, bias, mask, 0, 4, router_type)
    included = ids[steer == 1][:, :3].cpu()
    assert (included == torch.tensor([1, 4, 6], dtype=torch.int32)).all()


@pytest.mark.parametrize("router_type", ["norm", "softmax", "sigmoid"])
def test_more_choices_than_free_experts(router_type):
    # All but one expert excluded: k=4 still returns 4 ids, excludes last and in id order.
    num_experts = 8
    logits = torch.randn(5, num_experts, device=DEVICE)
    bias = torch.zeros(2, 1, num_experts, device=DEVICE)
    mask = torch.full((2, 1, num_experts), -1, dtype=torch.int8, device=DEVICE)
    mask[0] = 0
    mask[1, 0, 5] = 0
    steer = torch.ones(5, dtype=torch.int32, device=DEVICE)
    ids, weights = _check(logits, steer, bias, mask, 0, 4, router_type)
    assert ids[:, 0].eq(5).all() and ids[:, 1:].cpu().eq(torch.tensor([0, 1, 2], dtype=torch.int32)).all()


def test_strided_logits_and_layer_choice():
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(40, 24, generator=gen).to(DEVICE)
    logits = wide[:, 4:20]  # [40, 16], row stride 24: a view, not a copy
    bias, mask = steering_tables(4, 6, 16, gen)
    steer = torch.randint(0, 5, (40,), generator=gen, dtype=torch.int32).to(DEVICE)
    for layer in (0, 5):
        _check(logits, steer, bias, mask, layer, 2, "sigmoid", renormalize=True)


@pytest.mark.parametrize("router_type", ["norm", "softmax", "sigmoid"])
def test_unsteered_variant_equals_the_zero_row(router_type):
    # steering None (UNIPOOL_STEERING=0) compiles the kernel without the tables: same routing as row 0.
    logits, steer, bias, mask = _inputs(33, 24, seed=7)
    plain, _ = _check(logits, None, None, None, 1, 2, router_type, norm_scale=1.3)
    zero_rows, _ = _check(logits, torch.zeros_like(steer), bias, mask, 1, 2, router_type, norm_scale=1.3)
    assert torch.equal(plain, zero_rows)


@pytest.mark.parametrize("router_type,renormalize", [("norm", False), ("softmax", True), ("sigmoid", False)])
def test_per_token_budgets_drop_the_last_slots(router_type, renormalize):
    logits, steer, bias, mask = _inputs(40, 24, seed=9)
    budget = torch.randint(0, 5, (40,), generator=torch.Generator().manual_seed(2), dtype=torch.int32).to(DEVICE)
    ids, weights = _check(logits, steer, bias, mask, 1, 4, router_type, renormalize=renormalize, budget=budget)
    full, _ = _check(logits, steer, bias, mask, 1, 4, router_type, renormalize=renormalize)
    for t in range(40):
        kept = int(budget[t])
        assert torch.equal(ids[t, :kept], full[t, :kept])  # the budget keeps the best choices
        assert (ids[t, kept:] == 24).all() and (weights[t, kept:] == 0).all()  # the rest are dropped


def test_rejects_bad_inputs():
    logits, steer, bias, mask = _inputs(4, 8, seed=1)
    spec = RoutingSpec.of("softmax", 2)
    with pytest.raises(AssertionError):
        fused_route(logits, SteeringView(steer.long(), bias, mask), 0, spec)
    with pytest.raises(AssertionError):
        fused_route(logits, SteeringView(steer, bias, mask.float()), 0, spec)
    with pytest.raises(AssertionError):
        fused_route(logits, SteeringView(steer, bias, mask), 0, RoutingSpec.of("softmax", 9))  # k > E
    with pytest.raises(AssertionError):
        fused_route(logits, SteeringView(steer, bias, mask), 3, spec)  # layer out of range
    with pytest.raises(ValueError, match="router kind"):
        RoutingSpec.of("topk", 2)
