"""Steps that need no seam run a second compiled variant of the model: no table read, no capture copy.

A model compiled once runs its seams in every step: the routers read the steering tables,
the layers copy their routing into the capture buffers. A branch on the step's rows would be
frozen into the graph. So its layers are compiled twice, side by side, with nothing owned twice:

  the model itself   its routers read the step's rows and its layers record the routing: a step
                     with a steered token, a budget, or a request whose routing is captured or
                     probed
  PlainVariant       neither: op for op what an engine built with UNIPOOL_STEERING=0 and
                     UNIPOOL_ROUTING_CAPTURE=0 runs (the routing counts stay: they count every step)

`IdleSteps` chooses per step, in plain Python outside both graphs, from the flags the worker
hook sets with the step's index (`SteeringTable.step_reads`, `RoutingCapture.step_records`).
The variant runs inside `plain_step`, the table's `reading` and the capture's `recording`
off: while it is traced (vLLM drops dynamo's guards, so the flags are read then and never
again) its graph gets neither seam, and in eager mode the flags do the same at run time. The
worker's warm-up runs each dummy step both ways, so both variants are compiled (and, where
vLLM captures CUDA graphs, captured) before the engine serves (steering/worker.py). Our own
model dispatches through it (vllm_model.py); for vLLM's families the hooks read the same flags
and their model's inner module dispatches through it (steering/family_hooks.py).
`always_read`, a benchmark switch (benchmarks/bench_idle_seam.py): every step on the model, as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from vllm.compilation.backends import set_model_tag
from vllm.compilation.decorators import support_torch_compile
from vllm.config import set_current_vllm_config
from vllm.sequence import IntermediateTensors

from ..routing_capture import RoutingCapture
from .table import SteeringTable

VARIANT_TAG = "unipool_plain"  # its own name in vLLM's compile logs and caches


@contextlib.contextmanager
def plain_step(table: SteeringTable, capture: RoutingCapture | None):
    """The layers neither read the steering tables nor record the routing in this block."""
    with table.unread(), capture.unrecorded() if capture is not None else contextlib.nullcontext():
        yield


# the token dimension of each input (positions: the last one, as in vLLM's M-RoPE models)
@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0,
                                         "inputs_embeds": 0})
class PlainVariant(nn.Module):
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
    """Runs each step on the model (`run_model`, the inner module's own call) or on its plain variant."""

    # every step on the model even when nobody steers: the worker's warm-up (to compile it) and benchmarks (as
    # the model ran before the plain variant existed)
    always_read: bool = False

    def __init__(self, inner: nn.Module, table: SteeringTable, capture: RoutingCapture | None, vllm_config,
                 run_model: Callable | None = None):
        self.table, self.capture = table, capture
        self.run_model = run_model or inner.__call__
        self.variant: PlainVariant | None = None
        self.steps = {"read": 0, "unread": 0}  # steps run each way (warm-up included): tests, debugging
        if table.enabled or (capture is not None and capture.enabled):  # with both seams built off: one graph
            with set_current_vllm_config(vllm_config), set_model_tag(VARIANT_TAG):
                self.variant = PlainVariant(vllm_config=vllm_config, inner=inner)

    def __call__(self, *args, **kwargs):
        records = self.capture is not None and self.capture.step_records
        if self.variant is None or self.table.step_reads or records or self.always_read:
            if self.table.enabled and not self.table.step_reads:  # no row or budget of an earlier step applies
                self.table.clear_index()
            self.steps["read"] += 1
            return self.run_model(*args, **kwargs)
        self.steps["unread"] += 1
        with plain_step(self.table, self.capture):
            return self.variant(*args, **kwargs)

    @classmethod
    def route_calls_of(cls, inner: nn.Module, table: SteeringTable, capture: RoutingCapture | None,
                       vllm_config) -> IdleSteps:
        """Make every call of a model's inner module (one of vLLM's families: its decoder stack, which
        its outer class calls) go through IdleSteps. Its class is swapped for a subclass whose
        `__call__` dispatches; the module, its parameters and its forward are unchanged."""
        own_call = type(inner).__call__
        idle_steps = cls(inner, table, capture, vllm_config,
                         run_model=lambda *args, **kwargs: own_call(inner, *args, **kwargs))
        inner.__class__ = type(type(inner).__name__, (type(inner),),
                               {"__call__": lambda self, *args, **kwargs: idle_steps(*args, **kwargs)})
        return idle_steps
