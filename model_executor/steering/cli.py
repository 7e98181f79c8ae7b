"""`unipool-steering`: create and inspect steering profile files.

  unipool-steering create --model DIR --json profile.json --out NAME.safetensors
  unipool-steering create --model DIR --name NAME --bias bias.npy --alpha 1.5 --out NAME.safetensors
  unipool-steering show NAME.safetensors [--model DIR]

--model reads the shapes (layers, experts, top-k, router kind, layers without experts) from
the folder's config.json: a UniPool model or any of vLLM's MoE families steering supports.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .profile import SteeringProfile, SteeringProfileError
from .shape import SteerableModel


def _load_array(path: Path) -> torch.Tensor:
    if path.suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(path)).float()
    if path.suffix in (".pt", ".pth"):
        return torch.as_tensor(torch.load(path, weights_only=True)).float()
    raise SteeringProfileError(f"--bias {path}: expected a .npy or .pt file")


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
    show = sub.add_parser("show", help="validate a profile file and print its summary")
    show.add_argument("path", type=Path)
    show.add_argument("--model", type=Path, help="also check it fits this model folder")
    args = parser.parse_args(argv)

    try:
        config = SteerableModel.from_folder(args.model) if args.model else None
        if args.command == "show":
            profile = SteeringProfile.load(args.path, config)
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
