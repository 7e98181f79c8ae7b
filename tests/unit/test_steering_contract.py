"""The steering contract, the engine's table and the per-token row expansion, without an engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unipool_serve.model_executor.steering import contract
from unipool_serve.model_executor.steering.table import SteeringTable, expand_rows

SECRET = b"k" * 32


def test_signed_rows_verify_and_forged_ones_do_not():
    args = contract.steering_args(SECRET, "safe", 3, "abcd")
    assert contract.verified_row(args, SECRET)[:4] == (3, "abcd", None, 0)
    budgeted = contract.steering_args(SECRET, None, 0, "", 1)
    assert contract.verified_row(budgeted, SECRET)[:4] == (0, "", 1, 0)
    with pytest.raises(ValueError, match="not signed"):
        contract.verified_row({**budgeted, contract.ARG_TOP_K: 2}, SECRET)  # a raised budget is a forgery
    assert contract.verified_row({"other": 1}, SECRET) is None
    for forged in ({**args, contract.ARG_SLOT: 4}, {**args, contract.ARG_DIGEST: "ffff"},
                   {**args, contract.ARG_SIGNATURE: "0" * 64}, {k: v for k, v in args.items() if "sig" not in k}):
        with pytest.raises(ValueError, match="not signed"):
            contract.verified_row(forged, SECRET)
    with pytest.raises(ValueError, match="not signed"):
        contract.verified_row(args, b"another secret")
    with pytest.raises(ValueError, match="never received"):
        contract.verified_row(args, None)


def test_salts_differ_by_profile_and_user_salt_and_stay_within_vllm_limits():
    salts = {contract.cache_salt(SECRET, h, u) for h in ("h1", "h2") for u in (None, "x")}
    assert len(salts) == 4
    assert all(len(s) <= 128 and not set(s) & set("@/\\") for s in salts)
    assert contract.cache_salt(b"other secret", "h1", None) not in salts  # unguessable without the secret


def test_every_rpc_of_the_contract_is_a_worker_method():
    from unipool_serve.model_executor.steering.worker import SteeringWorker

    declared = {value for key, value in vars(contract).items() if key.startswith("RPC_") and isinstance(value, str)}
    assert declared == set(contract.RPC_NAMES), "every RPC_* name is listed in contract.RPC_NAMES"
    for name in contract.RPC_NAMES:
        assert callable(getattr(SteeringWorker, name))


def test_a_profiles_rows_are_keyed_by_the_contracts_tables():
    from unipool_serve.demo.tiny_model import tiny_config
    from unipool_serve.model_executor.steering.profile import SteeringProfile
    from unipool_serve.model_executor.steering.table import ROW_DTYPES

    profile = SteeringProfile.for_config(tiny_config(), name="p", exclude={0: [1]})
    slot, rows, row_digest, _ = contract.set_profile_args(SECRET, 3, profile)
    assert tuple(rows) == tuple(ROW_DTYPES) == contract.ROW_TABLES
    table = SteeringTable(4, profile.num_layers, profile.num_experts, 4, profile.top_k)
    table.set_row(slot, rows, row_digest)
    assert table.mask[3, 0, 1] == -1 and table.holds(3, row_digest)
    with pytest.raises(ValueError, match="row tables"):
        table.set_row(slot, {"bias": rows["bias"]}, row_digest)
    assert contract.set_profile_args(SECRET, 3, None)[1] is None  # clears the row


def test_one_budget_rule():
    assert contract.parse_budget(None) is None and contract.parse_budget({"top_k": 0}) == 0
    for bad in ({"top_k": -1}, {"top_k": True}, {"top_k": "1"}, {"k": 1}, 1):
        with pytest.raises(contract.BudgetError, match="expert_budget"):
            contract.parse_budget(bad)
    assert contract.effective_budget(None, None, 2, False) is None
    assert contract.effective_budget(2, 1, 2, False) == 1  # a request cannot raise its profile's budget
    assert contract.effective_budget(2, None, 2, False) is None  # the full k is no budget at all
    with pytest.raises(contract.BudgetError, match="exceeds the model's top_k=2"):
        contract.effective_budget(3, None, 2, True)
    with pytest.raises(contract.BudgetError, match="no shared expert"):
        contract.effective_budget(0, None, 2, False)
    assert contract.effective_budget(0, None, 2, True) == 0


def test_expand_rows_gives_each_token_its_requests_row():
    rows = np.array([0, 2, 5], dtype=np.int32)
    starts = np.array([0, 3, 4, 9, 9])  # 3 requests scheduled (a 4th entry past them is ignored)
    assert expand_rows(rows, starts).tolist() == [0, 0, 0, 2, 5, 5, 5, 5, 5]
    assert expand_rows(np.array([], dtype=np.int32), np.array([0])).tolist() == []


def test_table_rows_and_the_step_index():
    table = SteeringTable(max_tokens=8, num_layers=2, num_experts=4, max_profiles=2, top_k=2)
    table.set_row(2, {"bias": torch.ones(2, 4), "mask": torch.full((2, 4), -1)}, "d2")
    assert table.holds(2, "d2") and not table.holds(2, "other") and not table.holds(1, "d2")
    table.index.fill_(7)  # stale values from an earlier step or a warm-up run
    table.fill_index(5, np.array([2, 2, 0], dtype=np.int32))
    assert table.index.tolist() == [2, 2, 0, 0, 0, 7, 7, 7]  # this step's 5 tokens written, the rest untouched
    view = table.view(5)
    assert view.index.shape == (5,) and view.bias.data_ptr() == table.bias.data_ptr()
    table.clear_row(2)
    assert not table.holds(2, "d2") and table.bias[2].abs().sum() == 0 and table.mask[2].abs().sum() == 0
    with pytest.raises(ValueError, match="outside 1..2"):
        table.set_row(0, {"bias": torch.zeros(2, 4), "mask": torch.zeros(2, 4)}, "row 0 is never written")
    table.fill_index(4, np.array([1, 1], dtype=np.int32), np.array([1, 0], dtype=np.int32))
    assert table.budget[:4].tolist() == [1, 0, 2, 2]  # budgets written, the rest back to the full k
    assert SteeringTable(8, 2, 4, 2, top_k=2, enabled=False).view(5) is None


def test_a_step_reads_the_tables_only_when_a_token_has_a_row_or_a_budget():
    table = SteeringTable(max_tokens=8, num_layers=2, num_experts=4, max_profiles=2, top_k=2)
    table.fill_index(5, np.array([0, 2], dtype=np.int32))
    assert table.step_reads and table.view(5) is not None
    assert not table.step_budgets and table.view(5).budget is None  # no budget: its layers look for no dropped slot
    table.fill_index(5, None, None)  # nobody steered, no budget: the plain variant runs
    assert not table.step_reads
    table.fill_index(3, None, np.array([1, 2, 2], dtype=np.int32))  # a budget alone reads them too
    assert table.step_reads and table.step_budgets and table.view(3).budget.tolist() == [1, 2, 2]
    table.fill_index(3, np.array([1, 0, 0], dtype=np.int32))
    with table.budgeted():  # the warm-up traces the budgeted variant in a step without budgets
        assert table.view(3).budget.tolist() == [2, 2, 2]
    assert table.view(3).budget is None
    with table.unread():  # the plain variant runs (or is traced): routers read nothing
        assert table.view(3) is None
    assert table.view(3) is not None
    off = SteeringTable(8, 2, 4, 2, top_k=2, enabled=False)  # UNIPOOL_STEERING=0: never
    off.fill_index(5, np.array([1, 1], dtype=np.int32))
    assert not off.step_reads


def test_a_step_without_rows_after_a_steered_one_finds_none_of_its_rows_in_the_index():
    """Whatever graph a step runs (a variant frozen by a CUDA graph, the model for a captured step), the
    index it could read holds no row or budget of an earlier step."""
    table = SteeringTable(max_tokens=8, num_layers=2, num_experts=4, max_profiles=2, top_k=2)
    table.fill_index(4, np.array([1, 2, 0, 1], dtype=np.int32), np.array([1, 0, 2, 1], dtype=np.int32))
    table.fill_index(4, None, None)
    assert not table.index.any() and (table.budget == 2).all()
