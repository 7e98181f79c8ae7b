"""Steps that nobody steers run a second compiled variant of the model, whose routers never read the tables.

A model compiled once reads the steering tables in every step: a branch on the step's rows
would be frozen into the graph. So its layers are compiled twice, side by side, with nothing
owned twice:

  the model itself   its routers read the step's rows: a step with a steered token or a budget
  UnsteeredVariant   its routers never read them: op for op what an engine built with
                     UNIPOOL_STEERING=0 runs

`IdleSteps` chooses per step, in plain Python outside both graphs, from the flag the worker
hook sets with the step's index (`SteeringTable.step_reads`). The variant runs with the table's
`reading` off: while it is traced (vLLM drops dynamo's guards, so the flag is read then and
never again) its graph gets no table read at all, and in eager mode the flag does the same at
run time. The worker's warm-up runs each dummy step both ways, so both variants are compiled
(and, where vLLM captures CUDA graphs, captured) before the engine serves (steering/worker.py).
Our own model dispatches through it (vllm_model.py); for vLLM's families the hooks read the same
flag and their model's inner module dispatches through it (steering/family_hooks.py).
`always_read`, a benchmark switch (benchmarks/bench_idle_seam.py): every step on the steered model, as before.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from vllm.compilation.backends import set_model_tag
from vllm.compilation.decorators import support_torch_compile
from vllm.config import set_current_vllm_config
from vllm.sequence import IntermediateTensors

from .table import SteeringTable

VARIANT_TAG = "unipool_unsteered"  # its own name in vLLM's compile logs and caches


# the token dimension of each input (positions: the last one, as in vLLM's M-RoPE models)
@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0,
                                         "inputs_embeds": 0})
class UnsteeredVariant(nn.Module):
    """A model's inner module (the layers), compiled again; it owns nothing (`inner` is a plain reference)."""

    def __init__(self, *, vllm_config, prefix: str = "", inner: nn.Module | None = None):
        super().__init__()
        self.__dict__["inner"] = inner

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.inner.forward(input_ids, positions, intermediate_tensors, inputs_embeds)


class IdleSteps:
    """Runs each step on the model (`run_model`, the inner module's own call) or on its unsteered variant."""

    # benchmarks: every step on the steered variant even when nobody steers, as the model ran before the
    # unsteered variant existed (its rows then reset each step: row 0, full k, as fill_index did)
    always_read: bool = False

    def __init__(self, inner: nn.Module, table: SteeringTable, vllm_config, run_model: Callable | None = None):
        self.table = table
        self.run_model = run_model or inner.__call__
        self.variant: UnsteeredVariant | None = None
        self.steps = {"read": 0, "unread": 0}  # steps run each way (warm-up included): tests, debugging
        if table.enabled:  # with steering built off, the model never reads the tables: one variant is all
            with set_current_vllm_config(vllm_config), set_model_tag(VARIANT_TAG):
                self.variant = UnsteeredVariant(vllm_config=vllm_config, inner=inner)

    def __call__(self, *args, **kwargs):
        if self.variant is None or self.table.step_reads or self.always_read:
            if self.always_read and not self.table.step_reads:  # no stale row or budget of an earlier step
                self.table.index.zero_()
                self.table.budget.fill_(self.table.top_k)
            self.steps["read"] += 1
            return self.run_model(*args, **kwargs)
        self.steps["unread"] += 1
        with self.table.unread():
            return self.variant(*args, **kwargs)

    @classmethod
    def route_calls_of(cls, inner: nn.Module, table: SteeringTable, vllm_config) -> IdleSteps:
        """Make every call of a model's inner module (one of vLLM's families: its decoder stack, which
        its outer class calls) go through IdleSteps. Its class is swapped for a subclass whose
        `__call__` dispatches; the module, its parameters and its forward are unchanged."""
        own_call = type(inner).__call__
        idle_steps = cls(inner, table, vllm_config, run_model=lambda *args, **kwargs: own_call(inner, *args, **kwargs))
        inner.__class__ = type(type(inner).__name__, (type(inner),),
                               {"__call__": lambda self, *args, **kwargs: idle_steps(*args, **kwargs)})
        return idle_steps
