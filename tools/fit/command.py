"""The `fit` subcommand of unipool-steering: flags, sources, and the one-line errors (exit 2)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

from unipool_serve.model_executor.config import UniPoolConfig
from unipool_serve.model_executor.steering.profile import SteeringProfile, SteeringProfileError, check_name
from unipool_serve.model_executor.steering.shape import SteerableModel
from .data import FitDataError, read_examples
from .judge import JUDGE_KINDS, JudgeError, parse_judge
from .pipeline import (DEFAULT_ALPHAS, DEFAULT_EXCLUDE_CAPS, DEFAULT_LAMBDAS, DEFAULT_MIN_RISK_DIFFERENCE, FitError,
                       FitOptions, run_fit)
from .sources import FitSourceError, ReferenceSource

HELP = """fit a steering profile from labelled examples: a bias (MASCing) and expert exclusions (SteerMoE), alone or
together, whichever the judge (or the surrogate) prefers; JSONL lines {"prompt": "..."} or {"messages": [...]} with
"label": 1 (behaviour to suppress) or 0 (to keep); docs/fitting-profiles.md"""


def add_parser(sub) -> None:
    fit = sub.add_parser("fit", help=HELP, description=HELP)
    fit.add_argument("--model", required=True, type=Path,
                     help="model folder (UniPool, or one of vLLM's MoE families); captured through its reference "
                          "model (a family: transformers' own) unless --server is given (then only its config.json "
                          "is read: the profile's shape and fingerprint, checked against the server's)")
    fit.add_argument("--server", metavar="URL", help="capture through a running unipool-serve server instead")
    fit.add_argument("--data", required=True, type=Path, help="labelled JSONL")
    fit.add_argument("--name", required=True, help="profile name")
    fit.add_argument("--out", required=True, type=Path, help="profile file to write (.safetensors)")
    fit.add_argument("--seed", type=int, default=0, help="split, surrogate and optimisation seed (default 0)")
    fit.add_argument("--lambda", dest="lambdas", type=float, nargs="+", default=list(DEFAULT_LAMBDAS),
                     metavar="L", help=f"L1 penalties to try (default {' '.join(map(str, DEFAULT_LAMBDAS))})")
    fit.add_argument("--alpha", dest="alphas", type=float, nargs="+", default=list(DEFAULT_ALPHAS), metavar="A",
                     help=f"strengths to choose from (default {' '.join(map(str, DEFAULT_ALPHAS))})")
    fit.add_argument("--threshold", type=float, default=0.1, help="|S| at or below this is zeroed (default 0.1)")
    fit.add_argument("--exclude-cap", dest="exclude_caps", type=int, nargs="+", default=list(DEFAULT_EXCLUDE_CAPS),
                     metavar="N", help="SteerMoE exclusions: per layer at most N experts, those label 1 selects "
                                       "most more often than label 0; one candidate set per N, tried alone and with "
                                       f"each bias (default {' '.join(map(str, DEFAULT_EXCLUDE_CAPS))}; 0: bias only)")
    fit.add_argument("--include-cap", type=int, default=0, metavar="N",
                     help="also include per layer at most N (<= top_k) experts label 0 selects most more often "
                          "(default 0: an included expert takes a slot of every token)")
    fit.add_argument("--min-risk-difference", type=float, default=DEFAULT_MIN_RISK_DIFFERENCE, metavar="D",
                     help="an expert is excluded (included) only if its selection rate on label 1 exceeds (falls "
                          f"short of) label 0's by at least D (default {DEFAULT_MIN_RISK_DIFFERENCE})")
    fit.add_argument("--risk-difference-bias", action="store_true",
                     help="also try the bias made from the risk difference itself (-rd scaled to [-1, 1] per layer, "
                          "as the demo's hand-made profiles are) beside the surrogate-fitted S: 50%% more candidates")
    fit.add_argument("--judge", help=f"choose among the candidates by generation: {JUDGE_KINDS} (flags the behaviour)")
    fit.add_argument("--judge-data", type=Path, metavar="FILE",
                     help="with --judge: labelled JSONL the judge chooses on, instead of a validation part of --data "
                          "(then split into training 80%% and test 20%%): e.g. prompts that lead to the behaviour, "
                          "while --data holds text that shows it")
    fit.add_argument("--judge-tokens", type=int, default=32, help="greedy tokens per judged continuation (default 32)")
    fit.add_argument("--surrogate-epochs", type=int, default=30)
    fit.add_argument("--bias-epochs", type=int, default=100)
    fit.add_argument("--compare", type=Path, action="append", default=[], metavar="PROFILE",
                     help="also evaluate this profile file (repeatable)")
    fit.add_argument("--description", default="")
    fit.add_argument("--device", default="cpu", help="reference model device (default cpu)")
    fit.add_argument("--api-key", help="--server: key for generation and tokenize requests")
    fit.add_argument("--admin-key", help="--server with --judge: uploads candidate profiles (then deletes them)")
    fit.add_argument("--served-model", help="--server: model name in requests (default: the first of /v1/models)")
    fit.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); small models on a busy "
                                                 "machine run several times faster on 1")
    fit.add_argument("--no-progress", action="store_true", help="no progress bars")


def _check_args(args) -> None:
    check_name(args.name)
    folder = args.out.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise FitError(f"--out {args.out}: {folder} is not a writable folder (checked before fitting)")
    for flag, values in (("--lambda", args.lambdas), ("--alpha", args.alphas)):
        if any(not math.isfinite(v) or v < 0 for v in values):
            raise FitError(f"{flag} values must be non-negative numbers, got {values}")
    if not any(a > 0 for a in args.alphas):
        raise FitError("--alpha needs at least one positive strength")
    if any(cap < 0 for cap in args.exclude_caps) or args.include_cap < 0:
        raise FitError(f"--exclude-cap and --include-cap must be non-negative, got {args.exclude_caps} and "
                       f"{args.include_cap}")
    if args.judge_data is not None and not args.judge:
        raise FitError("--judge-data needs --judge: the judge chooses among the candidates on those examples")
    if not 0 < args.min_risk_difference <= 1:
        raise FitError(f"--min-risk-difference must be in (0, 1], got {args.min_risk_difference}")
    for flag, value in (("--judge-tokens", args.judge_tokens), ("--surrogate-epochs", args.surrogate_epochs),
                        ("--bias-epochs", args.bias_epochs), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise FitError(f"{flag} must be at least 1, got {value}")


def _model_config(folder: Path):
    """(what profiles are made for: a UniPool config, or a family's transformers config; its SteerableModel)."""
    try:
        model = SteerableModel.from_folder(folder)
    except ValueError as exc:  # no config.json, or an architecture no steering code knows
        raise FitError(f"--model {folder}: {exc}") from None
    if model.is_unipool:
        return UniPoolConfig.from_pretrained(str(folder)), model
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder)), model


def open_source(args, model: SteerableModel):
    """Where the router logits come from: a server, the reference model, or a family's transformers model."""
    if args.server:
        from .server import ServerSource

        source = ServerSource(args.server, api_key=args.api_key, admin_key=args.admin_key, model=args.served_model,
                              num_layers=model.num_layers)
        try:
            source.check_model(model, args.model)
        except FitSourceError:
            source.close()
            raise
        return source
    if model.is_unipool:
        return ReferenceSource(args.model, device=args.device)
    from .family_source import FamilySource

    return FamilySource(args.model, model, device=args.device)


def run(args: argparse.Namespace) -> int:
    source = None
    try:
        _check_args(args)
        config, model = _model_config(args.model)
        examples, data_hash = read_examples(args.data)
        judge_examples, judge_hash = (read_examples(args.judge_data, "--judge-data", per_label=1)
                                      if args.judge_data is not None else ((), None))
        compare = [SteeringProfile.load(path, config) for path in args.compare]
        judge = parse_judge(args.judge) if args.judge else None
        torch.manual_seed(args.seed)
        if args.threads:
            torch.set_num_threads(args.threads)
        source = open_source(args, model)
        opts = FitOptions(name=args.name, seed=args.seed, lambdas=args.lambdas, alphas=[a for a in args.alphas if a > 0],
                          threshold=args.threshold, exclude_caps=args.exclude_caps, include_cap=args.include_cap,
                          risk_difference_bias=args.risk_difference_bias,
                          min_risk_difference=args.min_risk_difference, surrogate_epochs=args.surrogate_epochs,
                          bias_epochs=args.bias_epochs, judge=judge, judge_tokens=args.judge_tokens,
                          judge_examples=judge_examples, judge_data_hash=judge_hash,
                          description=args.description, compare=compare, progress=not args.no_progress)
        result = run_fit(source, config, examples, data_hash, opts)
        result.profile.save(args.out)
    except (FitDataError, FitError, JudgeError, FitSourceError, SteeringProfileError, OSError, ValueError) as exc:
        print(f"unipool-steering fit: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    finally:
        if source is not None and hasattr(source, "close"):
            source.close()
    acc = result.accuracy
    made = result.profile.provenance
    choice = "judge data" if args.judge_data is not None else "validation"
    print(f"surrogate accuracy: train {acc['train']:.1%}, {choice} {acc['val']:.1%}, test {acc['test']:.1%}")
    print(f"chosen: {made['kind']}: {result.chosen.describe()} (by {made['alpha_chosen_by']}), "
          f"{made['nonzero']} nonzero entries of {result.profile.num_layers} x {result.profile.num_experts}")
    where = "the --judge-data examples" if args.judge_data is not None else "the validation split"
    print(f"candidates on {where} (* chosen):")
    print(result.candidates_table())
    print("behaviour rate on the test split:")
    print(result.table())
    print(f"wrote {args.out}")
    return 0
