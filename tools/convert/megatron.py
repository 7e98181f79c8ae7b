"""Megatron-LM (UniPool fork) `--ckpt-format torch` checkpoint -> this project's model folder.

    convert_megatron(CKPT_DIR, OUT_DIR, vocab_file=..., merge_file=...)

Steps: find the iteration and read `args` from its first rank file (megatron_files.py,
safe_load.py); derive the config or refuse (megatron_args.py); open every rank file of the
TP x EP grid memory-mapped; check names, shapes, dtypes, replicated tensors and that the
layers of a pool really hold one pool (megatron_tensors.py); build the tokenizer; then
stream the merged tensors into a temporary folder and rename it into place
(output_folder.py). Nothing is written before every check has passed, and OUT_DIR appears
complete or not at all. Memory: the rank files are memory-mapped and the largest tensors
(the pools) are assembled one expert at a time.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unipool_serve.model_executor.config import UniPoolConfig
from .errors import ConversionError
from .megatron_args import read_run
from .megatron_files import find_iteration_dir, first_rank_file, rank_grid
from .megatron_tensors import MegatronTensors, detect_layout
from .output_folder import check_new_folder, output_folder, write_safetensors
from .safe_load import load_rank_file
from .tokenizer_files import choose_tokenizer

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


@dataclass
class ConversionReport:
    """What was converted, for the summary line and for tests."""

    out_dir: Path
    iteration_dir: Path
    config: UniPoolConfig
    tp_size: int
    ep_size: int
    expert_layout: str
    dtype: torch.dtype
    bytes_written: int
    tokenizer: str
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        c = self.config
        pools = f"{c.num_pools} pool{'s' if c.num_pools > 1 else ''} of {c.num_experts} experts"
        router = f"{c.router_type} router top-{c.num_experts_per_tok}"
        if c.routing_spec().kind.learned_scale:  # NormRouter: its constant c
            router += f", c={c.norm_router_c:.9g}"
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"wrote {self.out_dir} from {self.iteration_dir} (TP={self.tp_size}, EP={self.ep_size}, "
                f"{self.expert_layout} experts): {c.num_hidden_layers} layers, {pools}, {router}, {dtype}, "
                f"{self.bytes_written / 1e6:.1f} MB; tokenizer: {self.tokenizer}")


def _progress_bars(enabled: bool):
    """tqdm bars on stderr; None lets tqdm hide them when stderr is not a terminal."""
    from tqdm.auto import tqdm

    return lambda iterable=None, **kw: tqdm(iterable, disable=None if enabled else True, leave=False, **kw)


def _model_state(loaded: dict, path: Path) -> dict:
    if "model" not in loaded:
        virtual = sorted(k for k in loaded if k.startswith("model") and k[5:].isdigit())
        if virtual:
            raise ConversionError(f"{path} holds {', '.join(virtual)}: virtual pipeline stages are not supported")
        raise ConversionError(f"{path} has no 'model' entry (keys: {sorted(loaded)[:8]}): not a Megatron checkpoint")
    return loaded["model"]


def convert_megatron(
    ckpt_dir: Path, out_dir: Path, *, iteration: int | None = None, dtype: str = "auto",
    vocab_file: Path | None = None, merge_file: Path | None = None, tokenizer_dir: Path | None = None,
    trust_pool_leader: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True,
) -> ConversionReport:
    """Convert one iteration of a Megatron checkpoint; raises ConversionError for bad input."""
    bars = _progress_bars(progress)
    if dtype != "auto" and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
    check_new_folder(Path(out_dir))  # before minutes of checks, not after
    iteration_dir = find_iteration_dir(Path(ckpt_dir), iteration)
    first = load_rank_file(first_rank_file(iteration_dir))
    args = first.get("args")
    if not isinstance(args, argparse.Namespace):
        raise ConversionError(f"{iteration_dir}: the rank files hold no training `args` namespace (found "
                              f"{type(args).__name__}); they are needed to know the model's shape")
    run = read_run(args)
    grid = rank_grid(iteration_dir, run.tp_size, run.pp_size, run.ep_size)
    states = {key: _model_state(load_rank_file(path), path)
              for key, path in bars(sorted(grid.paths.items()), desc="opening rank files")}
    layout = detect_layout(states[(0, 0)])
    source = MegatronTensors(run.config, layout, grid, states)
    source.check(trust_pool_leader, bars)
    if trust_pool_leader and run.config["layers_per_pool"] > 1:
        run.notes.append("--trust-pool-leader: each pool's experts were taken from its first layer; the other "
                         "layers' copies were not compared")

    model_dtype = DTYPES[dtype] if dtype != "auto" else states[(0, 0)]["embedding.word_embeddings.weight"].dtype
    chosen = choose_tokenizer(run, vocab_file, merge_file, tokenizer_dir, run.config["vocab_size"],
                              run.config["max_position_embeddings"])
    tok = chosen.tokenizer
    try:
        config = UniPoolConfig(**run.config, dtype=str(model_dtype).removeprefix("torch."),
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
    except ValueError as exc:
        raise ConversionError(f"the checkpoint's args give an invalid config: {exc}") from exc
    config.architectures = ["UniPoolForCausalLM"]

    plan = source.plan()
    dtypes = {t.name: torch.float32 if t.is_router else model_dtype for t in plan}
    with output_folder(Path(out_dir)) as tmp:
        written = write_safetensors(tmp, plan, dtypes, max_shard_bytes, bars)
        config.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
    return ConversionReport(Path(out_dir), iteration_dir, config, grid.tp_size, grid.ep_size, layout[0],
                            model_dtype, written, chosen.source, run.notes)
