"""Opening a Megatron rank file without running code from it, and without Megatron installed.

A `model_optim_rng.pt` is a pickle. `torch.load(weights_only=True)` rebuilds tensors and
plain containers only; everything else must be allowlisted. A Megatron checkpoint also
pickles its training `args` (an `argparse.Namespace` holding Megatron enums such as
`AttnBackend` and a `signal.Signals`), numpy RNG state and, with Transformer Engine, `io.BytesIO` extra state.
Those names are bound here to inert stand-ins (`PickledStandIn`): they are never imported
or called, they only keep the pickled arguments. Any other type is refused with one line
naming it. `mmap=True` leaves tensor data on disk until it is read, so opening every rank
file of a multi-GB checkpoint costs next to no memory.
"""

from __future__ import annotations

import argparse
import contextlib
import pickletools
import zipfile
from pathlib import Path

import torch

from .errors import ConversionError

# Every enum class in megatron-core 0.16 and in the UniPool fork's megatron/ tree: the values
# `args` (and other entries of a rank file) may pickle. Listed by name, never imported.
MEGATRON_ENUMS = tuple(f"megatron.{name}" for name in (
    "core.datasets.indexed_dataset.DType", "core.datasets.utils.Split",
    "core.dist_checkpointing.strategies.base.StrategyAction", "core.dist_checkpointing.validation.StrictHandling",
    "core.distributed.fsdp.src.megatron_fsdp.fully_shard.ShardingStrategy",
    "core.distributed.fsdp.src.megatron_fsdp.megatron_fsdp.TrainingState",
    "core.distributed.fsdp.src.megatron_fsdp.param_and_grad_buffer.BucketStatus",
    "core.distributed.fsdp.src.megatron_fsdp.param_and_grad_buffer.PrefetchOrder",
    "core.distributed.param_and_grad_buffer.BufferType", "core.enums.Fp4Recipe", "core.enums.Fp8Recipe",
    "core.enums.ModelType", "core.export.data_type.DataType", "core.export.model_type.ModelType",
    "core.export.trtllm.trtllm_layers.TRTLLMLayers", "core.extensions.kitchen.KitchenConfigType",
    "core.extensions.transformer_engine.TransformerEngineConfigType", "core.inference.headers.Headers",
    "core.inference.inference_request.DynamicInferenceEventType", "core.inference.inference_request.Status",
    "core.inference.unified_memory.CompilationState", "core.pipeline_parallel.bridge_communicator.CommRole",
    "core.rerun_state_machine.RerunDiagnostic", "core.rerun_state_machine.RerunMode",
    "core.rerun_state_machine.RerunState", "core.rerun_state_machine.RerunValidationStatus",
    "core.transformer.cuda_graphs._GraphStatus", "core.transformer.enums.AttnBackend",
    "core.transformer.enums.AttnMaskType", "core.transformer.enums.AttnType", "core.transformer.enums.CudaGraphScope",
    "core.transformer.enums.LayerType", "core.transformer.enums.ModelType",
    "core.transformer.moe.router_replay.RouterReplayAction", "core.transformer.moe.upcycling_utils.ActivationFuncName",
    "core.transformer.moe.upcycling_utils.ExpertsType", "legacy.model.enums.AttnMaskType",
    "legacy.model.enums.AttnType", "legacy.model.enums.LayerType", "training.checkpointing.CheckpointType",
))
# The other types megatron-core itself declares safe for its checkpoints (megatron/core/safe_globals.py):
# args.exit_signal (signal.Signals), paths, namespaces, its optimizer config, numpy arrays (the RNG
# state) and Transformer Engine's BytesIO extra state. None is needed, none is rebuilt.
OTHER_STAND_INS = (
    "signal.Signals",
    "pathlib.PosixPath",
    "types.SimpleNamespace",
    "megatron.core.optimizer.optimizer_config.OptimizerConfig",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",
    "_io.BytesIO",
)


class PickledStandIn:
    """An inert object in place of a pickled value of a type the converter does not need."""

    pickled_name = "?"
    args: tuple = ()
    state = None

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    @property
    def value(self):  # an enum member pickles as EnumClass(value)
        return self.args[0] if self.args else None

    def __eq__(self, other):
        return isinstance(other, PickledStandIn) and (self.pickled_name, self.args) == (other.pickled_name, other.args)

    def __hash__(self):
        return hash((self.pickled_name, self.args))

    def __repr__(self):
        return f"{self.pickled_name}{self.args!r}"


def _stand_in(name: str) -> type:
    return type(name.rsplit(".", 1)[-1], (PickledStandIn,), {"pickled_name": name})


_ALLOWED = [(argparse.Namespace, "argparse.Namespace")] + [
    (_stand_in(name), name) for name in MEGATRON_ENUMS + OTHER_STAND_INS
]


def pickled_globals(path: Path) -> set[str]:
    """Every `module.name` the pickle in a torch.save zip refers to (read, never executed)."""
    with zipfile.ZipFile(path) as archive:
        record = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if record is None:
            raise ConversionError(f"{path}: no data.pkl inside: not a file written by torch.save")
        data = archive.read(record)
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
        elif isinstance(arg, str):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.add(f"{strings[-2]}.{strings[-1]}")
    return found


def _refused(path: Path) -> list[str]:
    ours = {name for _, name in _ALLOWED}
    try:  # torch's own allowlist (private; only used to word the error)
        from torch._weights_only_unpickler import _get_allowed_globals

        torch_allowed = set(_get_allowed_globals())
    except Exception:  # pragma: no cover - depends on torch internals
        torch_allowed = set()
    return sorted(g for g in pickled_globals(path) - ours - torch_allowed if not g.startswith("torch."))


@contextlib.contextmanager
def _exactly_our_allowlist():
    """weights_only's allowlist is process-wide, and other code adds to it (importing megatron.core
    registers its real classes): load with torch's defaults and ours only, whatever else ran."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        torch.serialization.add_safe_globals(_ALLOWED)
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)


def load_rank_file(path: Path) -> dict:
    """The top-level dict of one rank file; tensors memory-mapped, on the CPU."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ConversionError(f"{path}: not a zip-format torch.save file (legacy pre-1.6 format or not a "
                              "checkpoint); re-save it with a current torch")
    refused = _refused(path)
    if refused:
        raise ConversionError(
            f"{path}: refusing to unpickle {', '.join(refused)}: a Megatron rank file holds tensors, the "
            "argparse namespace `args` and Megatron enums; other types would run code from the file when loaded")
    try:
        with _exactly_our_allowlist():
            loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError from a truncated zip, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"{path}: cannot be loaded safely ({first[:300]})") from exc
    if not isinstance(loaded, dict):
        raise ConversionError(f"{path}: holds a {type(loaded).__name__}, not a Megatron checkpoint dict")
    return loaded
