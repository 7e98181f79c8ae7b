"""Steps run one of up to three compiled variants of a model, chosen per step: no seam costs a step that does not use it.

A model compiled once runs its seams in every step: the routers read the steering tables
and budgets, the layers copy their routing into the capture buffers. A branch on the step's
rows would be frozen into the graph. So its layers are compiled up to three times, side by
side, with nothing owned twice:

  the model itself   its routers read the step's rows and its layers record the routing: a step
                     with a steered token, or a request whose routing is captured or probed
  budgeted variant   the same, and its routers apply the step's expert budgets, so its layers
                     can drop slots and look for dropped ones (on CPU an opaque custom op with a
                     host read per layer: model_executor/moe_backend.py): a step that holds a budget
  plain variant      neither seam: op for op what an engine built with UNIPOOL_STEERING=0 and
                     UNIPOOL_ROUTING_CAPTURE=0 runs (the routing counts stay: they count every step)

`IdleSteps` chooses per step, in plain Python outside the graphs, from the flags the worker
hook sets with the step's index (`SteeringTable.step_reads` and `step_budgets`,
`RoutingCapture.step_records`). The flags are read while a variant is traced (vLLM drops
dynamo's guards, so they are read then and never again): the plain variant runs inside
`plain_step` (the table's `reading` and the capture's `recording` off), the budgeted variant
only in steps that hold a budget, the model itself in the others; in eager mode the flags do
the same at run time. The worker's warm-up runs each dummy step every way (`warm_up`), so
every variant is compiled (and, where vLLM captures piecewise CUDA graphs, captured) before the
engine serves (steering/worker.py; a full CUDA graph would replay the choice made at its capture,
so the worker turns full graphs into piecewise ones). Each variant's graphs are saved under their
own key (`key_saved_graphs`, and a class per variant). Our own model dispatches through it
(vllm_model.py); for vLLM's families the hooks read the same flags and their model's inner
module dispatches through it (steering/family_hooks.py). `always_read`, a benchmark switch
(benchmarks/bench_idle_seam.py): every step without a budget on the model, as before the plain
variant existed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from torch import nn
from vllm.compilation.backends import set_model_tag
from vllm.compilation.decorators import support_torch_compile
from vllm.config import set_current_vllm_config

from ..routing_capture import RoutingCapture
from ..settings import GRAPH_SETTINGS_KEY, graph_settings
from .table import SteeringTable

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def plain_step(table: SteeringTable, capture: RoutingCapture | None):
    """The layers neither read the steering tables nor record the routing in this block."""
    with table.unread(), capture.unrecorded() if capture is not None else contextlib.nullcontext():
        yield


class _CompiledAgain(nn.Module):
    """A model's inner module (the layers), compiled again; it owns nothing (`inner` is a plain reference)."""

    def __init__(self, *, vllm_config, prefix: str = "", inner: nn.Module | None = None):
        super().__init__()
        self.__dict__["inner"] = inner


# Each variant is a class with a forward of its own: vLLM keys the compiled graphs it saves by its config
# and the compiled forward's name and first line, so two variants of one class would share a saved graph.
# The token dimension of each input (positions: the last one, as in vLLM's M-RoPE models).
_TOKEN_DIMS = {"input_ids": 0, "positions": -1, "intermediate_tensors": 0, "inputs_embeds": 0}


@support_torch_compile(dynamic_arg_dims=_TOKEN_DIMS)
class PlainVariant(_CompiledAgain):
    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return self.inner.forward(input_ids, positions, intermediate_tensors, inputs_embeds)


@support_torch_compile(dynamic_arg_dims=_TOKEN_DIMS)
class BudgetedVariant(_CompiledAgain):
    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return self.inner.forward(input_ids, positions, intermediate_tensors, inputs_embeds)


VARIANTS = {"plain": (PlainVariant, "unipool_plain"), "budgeted": (BudgetedVariant, "unipool_budgeted")}


def key_saved_graphs(vllm_config) -> None:
    """Put the settings that shape the compiled graphs (model_executor/settings.py, GRAPH_SETTINGS) into
    vLLM's `additional_config`, which is part of the key of every graph vLLM saves: without them an engine
    started with UNIPOOL_STEERING=0 saved a model graph without table reads, and a later engine with
    steering on, the same model and vLLM config would load it and steer nothing."""
    extra = vllm_config.additional_config
    if isinstance(extra, dict):
        extra[GRAPH_SETTINGS_KEY] = graph_settings()
    else:
        logger.warning("vLLM's additional_config is not a dict (%s): compiled graphs saved by an engine with other "
                       "UNIPOOL_ settings may be loaded; set VLLM_DISABLE_COMPILE_CACHE=1", type(extra).__name__)


class IdleSteps:
    """Runs each step on the model (`run_model`, the inner module's own call) or one of its variants."""

    # every step without a budget on the model even when nobody steers: benchmarks (as the model ran before
    # the plain variant existed) and the worker's warm-up
    always_read: bool = False

    def __init__(self, inner: nn.Module, table: SteeringTable, capture: RoutingCapture | None, vllm_config,
                 run_model: Callable | None = None):
        self.table, self.capture = table, capture
        self.run_model = run_model or inner.__call__
        self.steps = {"read": 0, "budgeted": 0, "unread": 0}  # steps run each way (warm-up included): tests

        key_saved_graphs(vllm_config)

        def compiled_again(name: str) -> _CompiledAgain:
            cls, tag = VARIANTS[name]
            with set_current_vllm_config(vllm_config), set_model_tag(tag):
                return cls(vllm_config=vllm_config, inner=inner)

        # with both seams built off: one graph; budgets only where the tables are built
        seams = table.enabled or (capture is not None and capture.enabled)
        self.variant = compiled_again("plain") if seams else None
        self.budgeted = compiled_again("budgeted") if table.enabled else None

    def __call__(self, *args, **kwargs):
        if self.variant is None:
            return self.run_model(*args, **kwargs)
        if self.table.step_budgets:
            self.steps["budgeted"] += 1
            return self.budgeted(*args, **kwargs)
        if self.table.step_reads or (self.capture is not None and self.capture.step_records) or self.always_read:
            self.steps["read"] += 1
            return self.run_model(*args, **kwargs)
        self.steps["unread"] += 1
        with plain_step(self.table, self.capture):
            return self.variant(*args, **kwargs)

    def warm_up(self, dummy_run: Callable, *args, **kwargs):
        """Run one of the worker's warm-up steps every way, so that each variant is compiled (traced with
        the flags it is chosen by) before the engine serves; returns the last run's result."""
        if self.budgeted is not None:
            with self.table.budgeted():
                dummy_run(*args, **kwargs)
        self.always_read = True  # the model itself, with every seam (also where only capture is built)
        try:
            dummy_run(*args, **kwargs)
        finally:
            self.always_read = False
        return dummy_run(*args, **kwargs)

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
