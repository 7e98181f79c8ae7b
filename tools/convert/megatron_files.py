"""Where the rank files of a Megatron `--ckpt-format torch` checkpoint are.

Megatron (training/checkpointing.py, get_checkpoint_name) writes

    SAVE/latest_checkpointed_iteration.txt               the last iteration, or "release"
    SAVE/iter_{N:07d}/mp_rank_{tp:02d}/model_optim_rng.pt            TP only
    SAVE/iter_{N:07d}/mp_rank_{tp:02d}_{ep:03d}/model_optim_rng.pt   with expert parallelism
    SAVE/iter_{N:07d}/mp_rank_{tp:02d}_{pp:03d}[_{ep:03d}]/...       with pipeline parallelism

(`release/` instead of `iter_*` for release checkpoints). Which suffix means what is only
known from the run's `args`, so the grid is checked against them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ConversionError

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
_ITER_DIR = re.compile(r"^iter_(\d{7})$")
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


def _iterations(save_dir: Path) -> list[str]:
    return sorted(p.name for p in save_dir.iterdir() if p.is_dir() and (_ITER_DIR.match(p.name) or p.name == "release"))


def find_iteration_dir(ckpt_dir: Path, iteration: int | None) -> Path:
    """The iter_XXXXXXX (or release) folder to convert: `iteration`, else the tracker's, else the only one."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise ConversionError(f"CKPT_DIR {ckpt_dir} is not a folder: pass Megatron's --save folder "
                              "or one of its iter_XXXXXXX folders")
    if _ITER_DIR.match(ckpt_dir.name) or ckpt_dir.name == "release":
        if iteration is not None and ckpt_dir.name != f"iter_{iteration:07d}":
            raise ConversionError(f"--iteration {iteration} contradicts CKPT_DIR {ckpt_dir}, which is one "
                                  "iteration's folder: drop --iteration or pass the --save folder")
        return ckpt_dir
    if (ckpt_dir / ".metadata").exists() or any(ckpt_dir.glob("*.distcp")):
        raise _dist_format_error(ckpt_dir)
    available = _iterations(ckpt_dir)
    if iteration is None:
        tracker = ckpt_dir / TRACKER
        if tracker.exists():
            text = tracker.read_text().strip()
            name = "release" if text == "release" else (f"iter_{int(text):07d}" if text.isdigit() else None)
            if name is None:
                raise ConversionError(f"{tracker} holds {text!r}, not an iteration number or 'release': "
                                      "pass --iteration N")
        elif len(available) == 1:
            name = available[0]
        elif available:
            raise ConversionError(f"{ckpt_dir} has no {TRACKER} and several iterations ({', '.join(available)}): "
                                  "pass --iteration N")
        else:
            raise ConversionError(f"{ckpt_dir} holds no iter_XXXXXXX folder and no {TRACKER}: pass Megatron's "
                                  "--save folder of a --ckpt-format torch run")
    else:
        name = f"iter_{iteration:07d}"
    path = ckpt_dir / name
    if not path.is_dir():
        shown = ", ".join(available) if available else "none"
        raise ConversionError(f"{path} does not exist (iterations in {ckpt_dir}: {shown})")
    return path


def _dist_format_error(path: Path) -> ConversionError:
    return ConversionError(
        f"{path} is a torch_dist (distributed) checkpoint; this converter reads --ckpt-format torch: "
        "re-save it with Megatron's --ckpt-convert-format torch --ckpt-convert-save DIR")


@dataclass(frozen=True)
class RankGrid:
    """The rank files of one iteration: paths[(tp_rank, ep_rank)]."""

    iteration_dir: Path
    tp_size: int
    ep_size: int
    paths: dict[tuple[int, int], Path]

    def label(self, tp: int, ep: int) -> str:
        return self.paths[(tp, ep)].parent.name


def first_rank_file(iteration_dir: Path) -> Path:
    """mp_rank_00[...] of an iteration: where `args` is read from before the grid is known."""
    ranks = sorted(p for p in iteration_dir.iterdir() if p.is_dir() and _RANK_DIR.match(p.name))
    if not ranks:
        if (iteration_dir / ".metadata").exists() or any(iteration_dir.glob("*.distcp")):
            raise _dist_format_error(iteration_dir)
        raise ConversionError(f"{iteration_dir} holds no mp_rank_XX folder: not a --ckpt-format torch iteration")
    path = ranks[0] / RANK_FILE
    if not path.exists():
        raise ConversionError(f"rank file {path} is missing: copy the whole iteration folder")
    return path


def rank_grid(iteration_dir: Path, tp_size: int, pp_size: int, ep_size: int) -> RankGrid:
    """Every rank file that `args` says exists; an error names a missing or unexpected one."""
    if pp_size != 1:
        raise ConversionError(f"args.pipeline_model_parallel_size={pp_size}: pipeline-parallel checkpoints are not "
                              "supported yet; re-save with --pipeline-model-parallel-size 1 (e.g. Megatron's "
                              "checkpoint converter with --target-pipeline-parallel-size 1)")
    expected = {(t, e): f"mp_rank_{t:02d}" + (f"_{e:03d}" if ep_size > 1 else "")
                for t in range(tp_size) for e in range(ep_size)}
    present = {p.name for p in iteration_dir.iterdir() if p.is_dir() and _RANK_DIR.match(p.name)}
    unexpected = sorted(present - set(expected.values()))
    if unexpected:
        raise ConversionError(
            f"{iteration_dir} holds {', '.join(unexpected)}, which tensor_model_parallel_size={tp_size}, "
            f"expert_model_parallel_size={ep_size} in the checkpoint's args do not produce: the folder mixes runs")
    paths = {}
    for key, name in expected.items():
        path = iteration_dir / name / RANK_FILE
        if not path.exists():
            raise ConversionError(
                f"rank file {name}/{RANK_FILE} is missing from {iteration_dir} (tensor_model_parallel_size="
                f"{tp_size}, expert_model_parallel_size={ep_size} in the checkpoint's args): copy the whole "
                "iteration folder")
        paths[key] = path
    return RankGrid(iteration_dir, tp_size, ep_size, paths)
