"""`SteeringTable`: one model's steering rows in the engine, and the step's per-token row index.

All buffers are allocated once, when the model is built, and only ever updated in place:
compiled graphs (and CUDA graphs) keep their addresses, and a step whose index slice is
all zero routes exactly as an unsteered model.

  index   [max_tokens]     int32  row of each token of the current step (0 = none)
  budget  [max_tokens]     int32  experts each token of the step may use (its expert budget;
                                  the model's k when it has none)
  bias    [P_max+1, L, E]  fp32   MASCing bias rows, alpha folded in (row 0 = zeros)
  mask    [P_max+1, L, E]  int8   SteerMoE rows, +1 include / -1 exclude (row 0 = zeros)

`bias` and `mask` are the per-profile tables (ROW_DTYPES, keyed like contract.ROW_TABLES):
a row arrives as {table: [L][E] values} and a new table is one more key at both ends.

The table also records which profile content each row holds (`digests`, see
contract.digest), so a request admitted with a row that has since been rewritten is never
steered with another profile's content, and whether the current step reads the tables at
all (`step_reads`: some token of it has a row or a budget), and whether it holds a budget
(`step_budgets`). A step that does not read them (and whose routing nobody captures) runs the
model's plain variant, whose routers never read the tables (steering/idle_steps.py: the idle
seam then costs nothing); `reading` is off while that variant runs (or is traced), and `view()`
then gives the routers nothing to read. The budget is in the view only in a step that holds
one: a layer can drop slots only there, and only there looks for dropped ones (steps with
budgets run a variant of their own, traced with them). A step that reads the tables has the
first num_tokens entries of both per-token buffers written (`fill_index`); the first step
after it that reads none clears them whole: whatever graph a step runs, it never finds an
earlier step's rows or budgets (they persist between steps otherwise; warm-up runs bypass the
hooks, and the worker clears them after its warm-up).
Nothing here is specific to one model family: any MoE model's routers can read a table.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from unipool_serve.kernels.routing_spec import SteeringView

from ..settings import setting

ROW_DTYPES = {"bias": torch.float32, "mask": torch.int8}  # each of contract.ROW_TABLES -> its dtype


def expand_rows(rows: np.ndarray, query_start_loc: np.ndarray) -> np.ndarray:
    """Per-request rows [R] -> per-token rows [N]: request r's row for each of its tokens.

    query_start_loc [R + 1] holds the first token of each request in the step, and N =
    query_start_loc[R] (vLLM's layout: a request's scheduled tokens are contiguous).
    """
    return np.repeat(np.asarray(rows, dtype=np.int32), np.diff(query_start_loc[: len(rows) + 1]))


def max_step_tokens(vllm_config) -> int:
    """The most tokens one engine step can hold: what every per-token buffer is sized for."""
    return max(vllm_config.scheduler_config.max_num_batched_tokens,
               vllm_config.compilation_config.max_cudagraph_capture_size or 0)


class SteeringTable(nn.Module):
    """Persistent steering buffers read by every router of one model (see the module doc)."""

    def __init__(self, max_tokens: int, num_layers: int, num_experts: int, max_profiles: int, top_k: int,
                 enabled: bool = True):
        super().__init__()
        self.enabled = enabled  # False: routers never read the tables (fixed when the model is built)
        self.max_profiles = max_profiles
        self.top_k = top_k  # the model's k: a token without a budget uses it
        self.register_buffer("index", torch.zeros(max_tokens, dtype=torch.int32), persistent=False)
        self.register_buffer("budget", torch.full((max_tokens,), top_k, dtype=torch.int32), persistent=False)
        shape = (max_profiles + 1, num_layers, num_experts)
        for table, dtype in ROW_DTYPES.items():
            self.register_buffer(table, torch.zeros(shape, dtype=dtype), persistent=False)
        self.digests: dict[int, str] = {}  # row -> digest of the profile it holds
        self._written = False  # does the index hold a row or budget of an earlier step?
        self.step_reads = False  # does this step's index hold a row or a budget? (set with the index)
        self.step_budgets = False  # does it hold a budget? (set with the index)
        self.reading = True  # off while the plain variant of the model runs or is traced (idle_steps.py)

    @classmethod
    def for_model(cls, vllm_config, num_layers: int, num_experts: int, top_k: int) -> SteeringTable:
        """The table of one engine's model, sized for its steps and UNIPOOL_MAX_STEERING_PROFILES."""
        return cls(max_step_tokens(vllm_config), num_layers, num_experts, setting("UNIPOOL_MAX_STEERING_PROFILES"),
                   top_k, setting("UNIPOOL_STEERING"))

    def view(self, num_tokens: int) -> SteeringView | None:
        """What the routers of this step read (None: steering is built off, or this is the plain variant)."""
        if not (self.enabled and self.reading):
            return None
        return SteeringView(self.index[:num_tokens], self.bias, self.mask,
                            self.budget[:num_tokens] if self.step_budgets else None)

    @contextlib.contextmanager
    def budgeted(self):
        """Routers read the budgets in this block, whatever the index holds (the worker's warm-up traces
        the budgeted variant in a dummy step: its budgets are the full k, so nothing is dropped)."""
        before = self.step_budgets
        self.step_budgets = self.enabled
        try:
            yield
        finally:
            self.step_budgets = before

    @contextlib.contextmanager
    def unread(self):
        """Routers read nothing in this block (the plain variant of the model runs, or is traced)."""
        self.reading = False
        try:
            yield
        finally:
            self.reading = True

    # ---- rows (written by the worker's RPCs) ----------------------------------
    def _check_slot(self, slot: int) -> None:
        if not 1 <= slot <= self.max_profiles:
            raise ValueError(f"steering row {slot} outside 1..{self.max_profiles}")

    def set_row(self, slot: int, rows: Mapping[str, object], row_digest: str) -> None:
        """Write one profile's rows ({table: [L, E] values}, every per-profile table) into `slot`."""
        self._check_slot(slot)
        if set(rows) != set(ROW_DTYPES):
            raise ValueError(f"steering row tables {sorted(rows)}; this engine holds {sorted(ROW_DTYPES)}")
        for table, dtype in ROW_DTYPES.items():
            getattr(self, table)[slot].copy_(torch.as_tensor(rows[table], dtype=dtype))
        self.digests[slot] = row_digest

    def clear_row(self, slot: int) -> None:
        self._check_slot(slot)
        for table in ROW_DTYPES:
            getattr(self, table)[slot].zero_()
        self.digests.pop(slot, None)

    def holds(self, slot: int, row_digest: str) -> bool:
        """Does `slot` hold the profile with `row_digest`? (Row 0, no profile, holds "".)"""
        return (slot == 0 and row_digest == "") or self.digests.get(slot) == row_digest

    # ---- the step's index ---------------------------------------------------
    def clear_index(self) -> None:
        """No row and the full k for every token."""
        self.index.zero_()
        self.budget.fill_(self.top_k)
        self._written = False

    def fill_index(self, num_tokens: int, rows: np.ndarray | None, budgets: np.ndarray | None = None) -> None:
        """Reset the step's first num_tokens entries (no row, full k: padding and stale values),
        then write each token's row and budget (None: none this step). A step with neither
        reads no table: the index is cleared if an earlier step wrote it, else left as it is."""
        self.step_reads = self.enabled and (rows is not None or budgets is not None)
        self.step_budgets = self.enabled and budgets is not None
        if not self.step_reads:
            if self._written:
                self.clear_index()
            return
        self._written = True
        self.index[:num_tokens].zero_()
        self.budget[:num_tokens].fill_(self.top_k)
        for buffer, per_token in ((self.index, rows), (self.budget, budgets)):
            if per_token is not None and per_token.size:
                buffer[: per_token.shape[0]].copy_(torch.from_numpy(per_token))
