"""Measure a fitted demo profile on the demo's fixed held-out prompts (docs/fitting-profiles.md).

Code share of the greedy continuations of the 40 code prompts and prose share of those of
the 40 prose prompts (demo/eval.py: PROMPTS_CODE, PROMPTS_PROSE, exactly 32 new tokens,
</s> banned, the demo classifier), reference model, fp32: unsteered; the shipped
hand-derived profile named by --hand (`prose` or `code`), whole, bias only and exclusions
only; each profile given; and random controls of each given profile (per layer the same
nonzero bias values and the same number of excluded and included experts, moved together
to experts drawn at random, the same alpha; seeds 0, 1, 2: demo.eval.random_like). A
`prose` profile should turn code prompts' continuations to prose and leave prose prompts
prose; a `code` profile the other way round. Prints a Markdown table and writes JSON.

    .venv/bin/python scripts/demo_fit_eval.py --profile prose-fit.safetensors --json out.json
    .venv/bin/python scripts/demo_fit_eval.py --hand code --profile code-fit.safetensors --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from unipool_serve.demo.eval import DEMO_MODEL_DIR, PROMPTS_CODE, PROMPTS_PROSE, load_demo, measure, random_like
from unipool_serve.model_executor.steering.profile import SteeringProfile

SEEDS = (0, 1, 2)


def rows_of(path: Path, profile: SteeringProfile) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    made = profile.provenance or {}
    how = (f"risk-difference bias, alpha {profile.alpha:g}" if made.get("bias") == "risk difference" else
           f"lambda {made['lambda']:g}, alpha {profile.alpha:g}" if made.get("lambda") is not None else "")
    if profile.exclude or profile.include:
        how += f"{', ' if how else ''}{sum(map(len, profile.exclude.values()))} excluded"
    rows = [(f"`{path.name}` ({how or f'alpha {profile.alpha:g}'})", profile.bias_rows(), profile.mask_rows())]
    for seed in SEEDS:
        rb, rm = random_like(profile.bias, profile.mask_rows(), seed)
        rows.append((f"random control of `{path.name}`, seed {seed}", profile.alpha * rb, rm))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", type=Path, action="append", default=[], help="fitted profile (repeatable)")
    parser.add_argument("--hand", choices=("prose", "code"), default="prose",
                        help="the shipped hand-derived profile to compare with (default prose)")
    parser.add_argument("--json", type=Path, help="write the table here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_demo(DEMO_MODEL_DIR)
    hand = SteeringProfile.load(DEMO_MODEL_DIR / "steering" / f"{args.hand}.safetensors", model.config)
    steerings = [("unsteered", None, None),
                 (f"hand-derived `{args.hand}` (alpha {hand.alpha:g}, bias + exclusions)", hand.bias_rows(),
                  hand.mask_rows()),
                 (f"hand-derived `{args.hand}`, bias only", hand.bias_rows(), None),
                 (f"hand-derived `{args.hand}`, exclusions only", None, hand.mask_rows())]
    for path in args.profile:
        steerings += rows_of(path, SteeringProfile.load(path, model.config))
    results = []
    for label, bias, mask in steerings:
        start = time.perf_counter()
        code = measure(model, tokenizer, PROMPTS_CODE, bias_rows=bias, mask_rows=mask)
        prose = measure(model, tokenizer, PROMPTS_PROSE, bias_rows=bias, mask_rows=mask)
        nonzero = 0 if bias is None else int((bias != 0).sum())
        excluded = 0 if mask is None else int((mask == -1).sum())
        results.append({"steering": label, "nonzero_bias": nonzero, "exclusions": excluded,
                        "code_prompts": code, "prose_prompts": prose})
        print(f"{label}: code prompts {code}, prose prompts {prose} ({time.perf_counter() - start:.0f} s)", flush=True)
    lines = [f"| steering | nonzero S | exclusions | code share, {len(PROMPTS_CODE)} code prompts | "
             f"prose share, {len(PROMPTS_PROSE)} prose prompts |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['steering']} | {r['nonzero_bias']} | {r['exclusions']} | "
                     f"{100 * r['code_prompts']['code']:.0f}% | {100 * r['prose_prompts']['prose']:.0f}% |")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(["scripts/demo_fit_eval.py", *sys.argv[1:]]),
                                         "prompts": {"code": len(PROMPTS_CODE), "prose": len(PROMPTS_PROSE)},
                                         "rows": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
