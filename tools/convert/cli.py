"""`unipool-convert`: turn training checkpoints into model folders that `unipool-serve` serves.

  unipool-convert megatron CKPT_DIR OUT_DIR --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt
  unipool-convert megatron CKPT_DIR OUT_DIR --tokenizer HF_TOKENIZER_FOLDER --iteration 60000 --dtype bfloat16
  unipool-convert prune MODEL_DIR OUT_DIR --keep-fraction 0.5 --usage http://localhost:8000

Each source is a subcommand: `_add_megatron` registers one parser and the function that runs
it, so another (e.g. `prune`) is one more `_add_...` call in `SUBCOMMANDS`. Bad input ends
with one line, `unipool-convert: error: ...`, and exit code 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .errors import ConversionError

PROG = "unipool-convert"
DESCRIPTION = """Turn training checkpoints into model folders that unipool-serve serves.

  unipool-convert megatron CKPT_DIR OUT_DIR --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt
  unipool-convert megatron CKPT_DIR OUT_DIR --tokenizer HF_TOKENIZER_FOLDER --iteration 60000
  unipool-convert prune MODEL_DIR OUT_DIR --keep 96 --usage calibration.jsonl
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error of this command."""

    def error(self, message):
        raise ConversionError(f"{message} (see {self.prog} --help)")


def _size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB, 500MB or 1000000")
    scale = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
             "T": 10**12, "TB": 10**12}[match.group(2)]
    value = int(float(match.group(1)) * scale)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least one byte")
    return value


def _run_megatron(args: argparse.Namespace) -> None:
    from .megatron import convert_megatron  # torch and transformers load only when a conversion runs

    report = convert_megatron(
        args.ckpt_dir, args.out_dir, iteration=args.iteration, dtype=args.dtype, vocab_file=args.vocab_file,
        merge_file=args.merge_file, tokenizer_dir=args.tokenizer, trust_pool_leader=args.trust_pool_leader,
        max_shard_bytes=args.max_shard_size, progress=not args.no_progress,
    )
    for note in report.notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    print(f"{PROG}: {report.summary()}")


def _add_megatron(sub) -> None:
    p = sub.add_parser(
        "megatron", help="a Megatron-LM (UniPool fork) --ckpt-format torch checkpoint",
        description="Convert one iteration of a Megatron-LM --ckpt-format torch checkpoint (UniPool's fork: "
                    "--moe-expert-pool-mode hyper, NormRouter) into a model folder; TP and EP shards are merged. "
                    "See docs/megatron.md.")
    p.add_argument("ckpt_dir", type=Path, metavar="CKPT_DIR", help="Megatron's --save folder, or one iter_XXXXXXX folder")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the model folder to create (must not exist, or be empty)")
    p.add_argument("--iteration", type=int, help="iteration to convert (default: latest_checkpointed_iteration.txt)")
    p.add_argument("--vocab-file", type=Path, help="GPT-2 BPE vocab.json (Megatron's GPT2BPETokenizer)")
    p.add_argument("--merge-file", type=Path, help="GPT-2 BPE merges.txt")
    p.add_argument("--tokenizer", type=Path, metavar="FOLDER", help="a transformers tokenizer folder instead")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weights' dtype (default: the checkpoint's); routers are always float32")
    p.add_argument("--trust-pool-leader", action="store_true",
                   help="take each pool's experts from its first layer without checking the other layers' copies")
    p.add_argument("--max-shard-size", type=_size, default="5GB", help="largest safetensors file (default 5GB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_megatron)


def _run_prune(args: argparse.Namespace) -> None:
    from unipool_serve.model_executor.config import UniPoolConfig
    from ..usage import UsageError, read_usage
    from .prune import check_keep, prune_model

    if not (args.model_dir / "config.json").is_file():
        raise ConversionError(f"MODEL_DIR {args.model_dir} has no config.json")
    config = UniPoolConfig.from_pretrained(str(args.model_dir))
    keep = args.keep if args.keep is not None else round(args.keep_fraction * config.num_experts)
    check_keep(config, keep)  # before any usage is read
    try:
        usage = read_usage(args.usage, args.model_dir, config)
    except UsageError as exc:
        raise ConversionError(f"--usage {exc}") from None
    report = prune_model(args.model_dir, args.out_dir, keep, usage)
    for note in report.notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    print(f"{PROG}: {report.summary()}")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction between 0 and 1")
    return value


def _add_prune(sub) -> None:
    p = sub.add_parser(
        "prune", help="keep each pool's most used experts (a smaller model folder)",
        description="Write a model folder whose pools keep their N most used experts, ranked by the routing "
                    "counts of a running server or of a calibration run. See docs/expert-budgets.md.")
    p.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="a model folder in this project's format")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the model folder to create (must not exist, or be empty)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--keep", type=int, metavar="N", help="experts each pool keeps")
    size.add_argument("--keep-fraction", type=_fraction, metavar="F", help="share of each pool's experts to keep")
    p.add_argument("--usage", required=True, metavar="URL_OR_JSONL",
                   help="the URL of a unipool-serve server serving this model (its routing counts), or a JSONL "
                        "file of calibration prompts ({\"prompt\": ...} or {\"messages\": [...]} per line)")
    p.set_defaults(run=_run_prune)


SUBCOMMANDS = (_add_megatron, _add_prune)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.run(args)
    except ConversionError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unreadable input, full disk, no permission: the file and the reason
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{PROG}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
