"""Write the labelled JSONL for fitting a `prose` (or `code`) profile of the demo model (docs/fitting-profiles.md).

Code prompts are the behaviour to suppress (label 1), prose prompts the behaviour to keep
(label 0); `--suppress prose` swaps the labels, for a `code` profile. Both come from the demo corpus's calibration split (seed 1), cut the way the
demo's fixed prompts are (demo/eval.py `prompt_of`: a code prompt ends at the colon of its
first def/class line, a prose prompt is a first sentence). With `--documents` the examples
are the calibration documents themselves (about 100 tokens of code or prose each): text
that shows the behaviour, as SteerMoE's contrasting inputs do, rather than prompts that
lead to it. The held-out split (seed 2), where PROMPTS_CODE and PROMPTS_PROSE come from,
is never used for fitting.

    .venv/bin/python scripts/demo_fit_data.py --out demo-prose.jsonl [--per-kind 150] [--suppress code|prose]
                                              [--documents]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from unipool_serve.demo.corpus import CALIBRATION_SEED, documents
from unipool_serve.demo.eval import PROMPTS_CODE, PROMPTS_PROSE, make_prompts


def labelled(per_kind: int, suppress: str = "code", whole_documents: bool = False) -> list[dict]:
    make = documents if whole_documents else make_prompts
    code = make("code", per_kind, seed=CALIBRATION_SEED)
    prose = make("prose", per_kind, seed=CALIBRATION_SEED)
    held_out = set(PROMPTS_CODE) | set(PROMPTS_PROSE)
    overlap = held_out.intersection(code + prose)
    if overlap:  # the grammar can repeat a short prompt across splits; keep evaluation clean
        code = [p for p in code if p not in overlap]
        prose = [p for p in prose if p not in overlap]
    # interleaved so that a file cut short still holds both labels
    rows = []
    for c, p in zip(code, prose):
        rows += [{"prompt": c, "label": int(suppress == "code")}, {"prompt": p, "label": int(suppress == "prose")}]
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--per-kind", type=int, default=150, help="prompts of each kind (default 150)")
    parser.add_argument("--suppress", choices=("code", "prose"), default="code",
                        help="the kind labelled 1, the behaviour to suppress (default code: a `prose` profile)")
    parser.add_argument("--documents", action="store_true",
                        help="whole calibration documents instead of prompts cut from them")
    args = parser.parse_args(argv)
    rows = labelled(args.per_kind, args.suppress, args.documents)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = "prose" if args.suppress == "code" else "code"
    what = "documents" if args.documents else "prompts"
    print(f"wrote {args.out}: {len(rows) // 2} {args.suppress} {what} (label 1), {len(rows) // 2} {kept} (label 0)")


if __name__ == "__main__":
    main()
