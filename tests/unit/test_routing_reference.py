"""The routing semantics of kernels/routing_reference.py, checked against their definitions."""

import pytest
import torch

from unipool_serve.kernels import routing_reference
from unipool_serve.kernels.routing_spec import RoutingSpec, SteeringView


def route(z, top_k, kind, *, renormalize=False, norm_scale=1.0, norm_c=1.0, bias=None, mask=None):
    spec = RoutingSpec.of(kind, top_k, renormalize=renormalize, norm_c=norm_c)
    return routing_reference.route(z, spec, norm_scale, bias=bias, mask=mask)


def _logits(t=64, e=16, seed=0):
    return torch.randn(t, e, generator=torch.Generator().manual_seed(seed)) * 3


def test_norm_router_matches_the_paper_formula():
    z = _logits()
    sigma, c, k = 1.7, 3.2, 2
    ids, w = route(z, k, "norm", norm_scale=sigma, norm_c=c)
    s = sigma * c * torch.relu(z / (torch.linalg.vector_norm(z, dim=-1, keepdim=True) + 1e-8))
    expect_w, expect_ids = s.topk(k, dim=-1)
    assert torch.equal(ids.long(), expect_ids)
    torch.testing.assert_close(w, expect_w)  # gates are the raw scores, not renormalised


def test_softmax_renormalised_matches_mixtral_rule():
    z = _logits()
    ids, w = route(z, 2, "softmax", renormalize=True)
    p = torch.softmax(z, -1)
    top, top_ids = p.topk(2, -1)
    assert torch.equal(ids.long(), top_ids)
    torch.testing.assert_close(w, top / top.sum(-1, keepdim=True))
    _, w_raw = route(z, 2, "softmax", renormalize=False)
    torch.testing.assert_close(w_raw, top)


def test_sigmoid_router():
    z = _logits()
    ids, w = route(z, 3, "sigmoid")
    top, top_ids = torch.sigmoid(z).topk(3, -1)
    assert torch.equal(ids.long(), top_ids)
    torch.testing.assert_close(w, top)


@pytest.mark.parametrize("router", ["norm", "softmax", "sigmoid"])
def test_zero_bias_and_empty_mask_change_nothing(router):
    z = _logits()
    plain = route(z, 2, router)
    steered = route(z, 2, router, bias=torch.zeros_like(z), mask=torch.zeros(z.shape, dtype=torch.int8))
    assert torch.equal(plain[0], steered[0]) and torch.equal(plain[1], steered[1])


@pytest.mark.parametrize("router", ["norm", "softmax", "sigmoid"])
def test_excluded_experts_are_never_selected_and_included_always(router):
    z = _logits(t=256)
    mask = torch.zeros(z.shape, dtype=torch.int8)
    favourite = z.argmax(-1).bincount(minlength=16).argmax()  # the expert most tokens would pick
    mask[:, favourite] = -1
    mask[:, 5 if favourite != 5 else 6] = 1
    ids, w = route(z, 2, router, mask=mask)
    assert not (ids == favourite).any()
    assert (ids == (5 if favourite != 5 else 6)).any(dim=-1).all()
    assert torch.isfinite(w).all()


def test_norm_router_exclusion_is_applied_before_the_l2_norm():
    # Zeroing before the norm: the remaining scores are relu(z/||z_without_excluded||).
    z = _logits(t=8, e=6)
    mask = torch.zeros(z.shape, dtype=torch.int8)
    mask[:, 0] = -1
    _, w = route(z, 1, "norm", mask=mask)
    kept = z.clone()
    kept[:, 0] = 0
    s = torch.relu(kept / (kept.norm(dim=-1, keepdim=True) + 1e-8))
    s[:, 0] = -1
    torch.testing.assert_close(w[:, 0], s.max(-1).values)


def test_bias_uses_per_token_sigma_so_tokens_are_independent():
    z = _logits(t=32)
    bias = torch.randn(32, 16)
    batch = route(z, 2, "softmax", bias=bias)
    for t in (0, 7, 31):
        alone = route(z[t:t + 1], 2, "softmax", bias=bias[t:t + 1])
        assert torch.equal(alone[0], batch[0][t:t + 1])
        torch.testing.assert_close(alone[1], batch[1][t:t + 1], rtol=0, atol=0)
    # and the bias is scaled by that token's own logit spread
    sigma = z.std(-1, correction=0, keepdim=True)
    expect = route(z + sigma * bias, 2, "softmax")
    assert torch.equal(expect[0], batch[0])


def test_route_with_table_gathers_each_tokens_profile_row():
    layers, experts, t = 3, 8, 10
    bias_table = torch.zeros(3, layers, experts)
    bias_table[1, 2, 4] = 50.0  # profile 1 pushes expert 4 at layer 2
    mask_table = torch.zeros(3, layers, experts, dtype=torch.int8)
    mask_table[2, 2, 4] = -1  # profile 2 forbids it
    index = torch.tensor([0, 1, 2] * 3 + [1], dtype=torch.int32)
    z = _logits(t=t, e=experts)
    ids, _ = routing_reference.route_with_table(z, SteeringView(index, bias_table, mask_table), 2,
                                                RoutingSpec.of("softmax", 1))
    assert (ids[index == 1] == 4).all()
    assert not (ids[index == 2] == 4).any()
    plain, _ = route(z, 1, "softmax")
    assert torch.equal(ids[index == 0], plain[index == 0])


def test_a_budget_keeps_the_first_choices_and_renormalises_only_where_the_router_does():
    z = _logits(t=6, e=8)
    budget = torch.tensor([0, 1, 2, 3, 1, 2])
    spec = RoutingSpec.of("softmax", 3, renormalize=True)
    ids, w = routing_reference.route(z, spec, budget=budget)
    full, _ = routing_reference.route(z, spec)
    for t, kept in enumerate(budget.tolist()):
        assert torch.equal(ids[t, :kept], full[t, :kept]) and (ids[t, kept:] == 8).all()
        assert (w[t, kept:] == 0).all()
        if kept:
            torch.testing.assert_close(w[t].sum(), torch.tensor(1.0))  # renormalised over the kept ones
    norm = RoutingSpec.of("norm", 3, norm_c=2.0)
    kept_raw, _ = routing_reference.route(z, norm, budget=torch.full((6,), 2))[1], None
    raw = routing_reference.route(z, norm)[1]
    torch.testing.assert_close(kept_raw[:, :2], raw[:, :2])  # NormRouter gates stay the raw scores


def test_router_kinds_cross_process_boundaries():
    """Configs and specs holding a RouterKind are pickled to vLLM's worker processes."""
    import pickle

    from unipool_serve.kernels.routing_spec import ROUTER_KINDS

    for kind in ROUTER_KINDS.values():
        assert pickle.loads(pickle.dumps(kind)) == kind


def test_top_k_is_a_stable_descending_sorts_first_k_eager_and_compiled():
    top_k = routing_reference.top_k_lowest_id_first
    gen = torch.Generator().manual_seed(0)
    compiled = torch.compile(top_k, dynamic=True)
    for experts, k in ((4, 1), (8, 2), (16, 4), (64, 8)):
        key = torch.randint(0, 5, (200, experts), generator=gen).float()  # many ties
        key[torch.rand(200, experts, generator=gen) < 0.2] = float("-inf")  # excluded experts
        key[torch.rand(200, experts, generator=gen) < 0.1] = float("inf")  # included experts
        want = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(top_k(key, k), want), (experts, k)
        assert torch.equal(compiled(key, k), want), (experts, k)
