"""The `probe` subcommand of unipool-steering: flags, sources, and the one-line errors (exit 2)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from unipool_serve.model_executor.steering.probe import ProbeError
from unipool_serve.model_executor.steering.profile import SteeringProfileError, check_name
from unipool_serve.model_executor.steering.shape import SteerableModel

from .command import open_source
from .data import FitDataError, read_examples
from .probe import DEFAULT_FPR, fit_probe
from .sources import FitSourceError

HELP = """fit a routing probe from labelled examples: JSONL lines {"prompt": "..."} or {"messages": [...]}
with "label": 1 (the behaviour to detect) or 0; docs/probes.md"""


def add_parser(sub) -> None:
    probe = sub.add_parser("probe", help=HELP, description=HELP)
    probe.add_argument("--model", required=True, type=Path,
                       help="model folder; captured through its reference model (UniPool) or transformers' own "
                            "model (vLLM's families) unless --server is given")
    probe.add_argument("--server", metavar="URL", help="capture through a running unipool-serve server instead")
    probe.add_argument("--data", required=True, type=Path, help="labelled JSONL")
    probe.add_argument("--name", required=True, help="probe name")
    probe.add_argument("--out", required=True, type=Path, help="probe file to write (.safetensors)")
    probe.add_argument("--fpr", type=float, default=DEFAULT_FPR,
                       help=f"false-positive rate the threshold is chosen for, on the validation split "
                            f"(default {DEFAULT_FPR})")
    probe.add_argument("--l2", type=float, default=1e-2, help="L2 penalty of the logistic regression (default 0.01)")
    probe.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    probe.add_argument("--label-1", default="behaviour", help="what label 1 is (stored in the probe)")
    probe.add_argument("--label-0", default="other", help="what label 0 is")
    probe.add_argument("--description", default="")
    probe.add_argument("--device", default="cpu", help="reference model device (default cpu)")
    probe.add_argument("--api-key", help="--server: key for generation and tokenize requests")
    probe.add_argument("--served-model", help="--server: model name in requests (default: the first of /v1/models)")
    probe.add_argument("--no-progress", action="store_true", help="no progress bars")
    probe.set_defaults(admin_key=None)  # fit's sources take one; a probe uploads nothing


def _check_args(args) -> None:
    check_name(args.name)
    folder = args.out.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ProbeError(f"--out {args.out}: {folder} is not a writable folder (checked before fitting)")
    if not (math.isfinite(args.fpr) and 0 <= args.fpr < 1):
        raise ProbeError(f"--fpr {args.fpr} must be a rate in [0, 1)")
    if not (math.isfinite(args.l2) and args.l2 >= 0):
        raise ProbeError(f"--l2 {args.l2} must be >= 0")


def run(args: argparse.Namespace) -> int:
    source = None
    try:
        _check_args(args)
        model = SteerableModel.from_folder(args.model)
        examples, data_hash = read_examples(args.data)
        source = open_source(args, model)  # fit's: a server (its model checked), the reference or transformers' model
        fitted = fit_probe(source, model, examples, data_hash, name=args.name, seed=args.seed, fpr=args.fpr,
                           l2=args.l2, labels={"1": args.label_1, "0": args.label_0},
                           description=args.description, progress=not args.no_progress)
        fitted.probe.save(args.out)
    except (FitDataError, FitSourceError, SteeringProfileError, OSError, ValueError) as exc:
        print(f"unipool-steering probe: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    finally:
        if source is not None and hasattr(source, "close"):
            source.close()
    print(f"probe {fitted.probe.name}: threshold {fitted.probe.threshold:.4f} (at most {args.fpr:.0%} of the "
          "validation label-0 examples fire)")
    print(fitted.table())
    print(f"wrote {args.out}")
    return 0
