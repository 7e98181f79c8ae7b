"""`unipool-steering`: create and inspect steering profile files.

  unipool-steering create --model DIR --json profile.json --out NAME.safetensors
  unipool-steering create --model DIR --name NAME --bias bias.npy --alpha 1.5 --out NAME.safetensors
  unipool-steering show NAME.safetensors [--model DIR]
  unipool-steering subpool --model DIR --usage URL_OR_JSONL --keep-fraction 0.5 --name top-half --out top-half.safetensors
  unipool-steering fit --model DIR [--server URL] --data labelled.jsonl --name safe --out safe.safetensors [--judge SPEC]
  unipool-steering probe --model DIR [--server URL] --data labelled.jsonl --name code --out code.safetensors [--fpr 0.05]

--model reads the shapes (layers, experts, top-k, router kind, layers without experts) from
the folder's config.json: a UniPool model or any of vLLM's MoE families steering supports.

A sub-pool (UniPool models) is a profile that excludes every expert but each pool's most used
ones (ranked like `unipool-convert prune`, docs/expert-budgets.md): requests under it, or keys
bound to it, touch fewer expert weights per step. `fit` (UniPool models) makes a profile from
labelled examples (MASCing's pipeline; tools/fit/, docs/fitting-profiles.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from unipool_serve.model_executor.steering.profile import SteeringProfile, SteeringProfileError
from unipool_serve.model_executor.steering.shape import SteerableModel

from .fit import command as fit_command
from .fit import probe_command


def _load_array(path: Path) -> torch.Tensor:
    if path.suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(path)).float()
    if path.suffix in (".pt", ".pth"):
        return torch.as_tensor(torch.load(path, weights_only=True)).float()
    raise SteeringProfileError(f"--bias {path}: expected a .npy or .pt file")


def _subpool(args, model) -> SteeringProfile:
    from unipool_serve.model_executor.config import UniPoolConfig
    from .convert.prune import kept_experts
    from .usage import read_usage

    if not model.is_unipool:
        raise SteeringProfileError(f"subpool: {model.architecture} is not a UniPool model (pools and their usage "
                                   "are read from a UniPool folder)")
    config = UniPoolConfig.from_pretrained(str(args.model))

    keep = args.keep if args.keep is not None else round(args.keep_fraction * config.num_experts)
    kept = kept_experts(read_usage(args.usage, args.model, config), config, keep)
    exclude = {l: [e for e in range(config.num_experts) if e not in kept[config.layer_to_pool(l)]]
               for l in range(config.num_hidden_layers)}
    description = args.description or f"the {keep} most used experts of each pool (usage: {args.usage})"
    return SteeringProfile.for_config(config, name=args.name, exclude=exclude, description=description,
                                      expert_budget=None if args.top_k_budget is None else {"top_k": args.top_k_budget})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unipool-steering", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="write a profile for a model folder")
    create.add_argument("--model", required=True, type=Path, help="model folder (its config.json)")
    create.add_argument("--json", type=Path,
                        help="JSON description: name, description, alpha, bias, include, exclude, expert_budget")
    create.add_argument("--name", help="profile name (overrides the JSON)")
    create.add_argument("--bias", type=Path, help="[layers, experts] array as .npy or .pt")
    create.add_argument("--alpha", type=float, help="strength (overrides the JSON)")
    create.add_argument("--description", help="free text (overrides the JSON)")
    create.add_argument("--out", required=True, type=Path)
    subpool = sub.add_parser("subpool", help="write a profile that routes only to each pool's most used experts")
    subpool.add_argument("--model", required=True, type=Path, help="model folder (its config.json)")
    subpool.add_argument("--usage", required=True, metavar="URL_OR_JSONL",
                         help="a unipool-serve server serving this model, or a JSONL file of calibration prompts")
    size = subpool.add_mutually_exclusive_group(required=True)
    size.add_argument("--keep", type=int, metavar="N", help="experts each pool keeps")
    size.add_argument("--keep-fraction", type=float, metavar="F", help="share of each pool's experts to keep")
    subpool.add_argument("--name", required=True)
    subpool.add_argument("--description", default="")
    subpool.add_argument("--top-k-budget", type=int, help="also cap the experts per token")
    subpool.add_argument("--out", required=True, type=Path)
    fit_command.add_parser(sub)
    probe_command.add_parser(sub)
    show = sub.add_parser("show", help="validate a profile file and print its summary")
    show.add_argument("path", type=Path)
    show.add_argument("--model", type=Path, help="also check it fits this model folder")
    args = parser.parse_args(argv)
    if args.command == "fit":
        return fit_command.run(args)
    if args.command == "probe":
        return probe_command.run(args)

    try:
        config = SteerableModel.from_folder(args.model) if args.model else None
        if args.command == "show":
            profile = SteeringProfile.load(args.path, config)
        elif args.command == "subpool":
            profile = _subpool(args, config)
            profile.save(args.out)
            print(f"wrote {args.out}")
        else:
            desc = json.loads(args.json.read_text()) if args.json else {}
            for key in ("name", "alpha", "description"):
                if getattr(args, key) is not None:
                    desc[key] = getattr(args, key)
            if args.bias is not None:
                desc["bias"] = _load_array(args.bias)
            profile = SteeringProfile.from_description(desc, config)
            profile.save(args.out)
            print(f"wrote {args.out}")
    except (SteeringProfileError, ValueError, OSError) as exc:  # ValueError: bad JSON, unsupported model
        print(f"unipool-steering: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(profile.summary(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
