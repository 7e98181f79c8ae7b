"""Writing a model folder that appears complete or not at all, with tensors streamed to disk.

`output_folder(out)` yields a temporary folder beside `out` (same file system) and renames
it to `out` only after everything inside was written; on any error, or Ctrl-C, it is
removed. `write_safetensors` writes the safetensors format itself (8-byte header length,
JSON header, raw little-endian data) so a tensor is written piece by piece as its
producer yields it: a pool of many GB never has to exist in memory as one tensor.
Shards follow transformers' naming (`model-00001-of-00002.safetensors` + index).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import ConversionError
from .megatron_tensors import PlannedTensor

_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def check_new_folder(out: Path) -> None:
    """`out` may be created: it does not exist, or is an empty folder."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"OUT_DIR {out} already exists and is not an empty folder: choose a new path")


@contextlib.contextmanager
def output_folder(out: Path) -> Iterator[Path]:
    """A temporary folder, renamed to `out` when the block succeeds, deleted when it fails."""
    out = Path(out)
    check_new_folder(out)  # again: time has passed since the caller's early check
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the served folder private
        yield tmp
        os.replace(tmp, out)  # atomic on one file system; replaces an empty `out`
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _shards(plan: list[PlannedTensor], itemsize: dict[str, int], max_bytes: int) -> list[list[PlannedTensor]]:
    shards, current, size = [], [], 0
    for t in plan:
        nbytes = math.prod(t.shape) * itemsize[t.name]
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += nbytes
    return shards + [current] if current else shards


def _write_one(path: Path, tensors: list[PlannedTensor], dtypes: dict[str, torch.dtype], bar) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for t in tensors:
        nbytes = math.prod(t.shape) * dtypes[t.name].itemsize
        header[t.name] = {"dtype": _DTYPE_NAMES[dtypes[t.name]], "shape": list(t.shape),
                          "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in tensors:
            written, want = 0, header[t.name]["data_offsets"][1] - header[t.name]["data_offsets"][0]
            for piece in t.pieces():
                data = piece.to(dtypes[t.name]).contiguous().reshape(-1).view(torch.uint8)
                f.write(data.numpy().data)
                written += data.numel()
                bar.update(data.numel())
            if written != want:  # a producer bug, never a user error: stop before a corrupt file ships
                raise RuntimeError(f"{t.name}: wrote {written} bytes, its shape {t.shape} needs {want}")


def write_safetensors(folder: Path, plan: list[PlannedTensor], dtypes: dict[str, torch.dtype],
                      max_shard_bytes: int, progress) -> int:
    """Write `plan` into folder as one or more safetensors files; returns the bytes written."""
    if sys.byteorder != "little":  # safetensors is little-endian; the bytes are written as they are in memory
        raise ConversionError("this converter writes safetensors from memory and needs a little-endian machine")
    shards = _shards(plan, {n: d.itemsize for n, d in dtypes.items()}, max_shard_bytes)
    total = sum(math.prod(t.shape) * dtypes[t.name].itemsize for t in plan)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    with progress(total=total, unit="B", unit_scale=True, desc="writing tensors") as bar:
        for name, shard in zip(names, shards):
            _write_one(folder / name, shard, dtypes, bar)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total

