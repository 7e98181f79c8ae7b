"""Measure a routing probe of the demo model, and the `prose` profile gated by it (docs/probes.md).

1. Fit: `unipool-steering probe` on the demo's calibration prompts (scripts/demo_fit_data.py: 150
   code prompts as label 1, 150 prose prompts as label 0), threshold for a 5% false-positive rate
   on its validation split.
2. Detection: the probe's scores of the 40 + 40 fixed held-out prompts (demo/eval.py:
   PROMPTS_CODE, PROMPTS_PROSE; never used for fitting), read from a live `unipool-serve`'s
   `probe_scores`: AUROC, and the true- and false-positive rates at the probe's threshold.
3. Gating: greedy continuations (32 tokens, </s> banned) of all 80 prompts through the same
   server, unsteered, under `prose`, and under `prose` gated by the probe; the demo classifier
   reads each one. Reported: the code share of the code prompts and the prose share of the prose
   prompts under each, and how many gated continuations are byte-identical to the unsteered ones.

    .venv/bin/python scripts/demo_probe_eval.py --json docs/results/demo-probe.json [--probe code.safetensors]

--model and --profile run the same on another model trained on the demo corpus, e.g. the small
Mixtral scripts/family_fit_eval.py trains, with its fitted profile (its folder's steering/):
    .venv/bin/python scripts/demo_probe_eval.py --model /tmp/family-fit/MixtralForCausalLM \
        --profile prose-fit --json docs/results/family-probe-MixtralForCausalLM.json

The server runs eager, with the probe in a folder of its own, on a free port; the script stops it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from unipool_serve.demo.classifier import classify
from unipool_serve.demo.eval import PROMPTS_CODE, PROMPTS_PROSE
from unipool_serve.model_executor.steering.probe import RoutingProbe
from unipool_serve.tools.fit.probe import auroc

REPO = Path(__file__).resolve().parent.parent
TOKENS = 32


DEMO = REPO / "models" / "unipool-demo"


def fit(work: Path, model: Path) -> Path:
    data, out = work / "demo-code.jsonl", work / "probes" / "code.safetensors"
    out.parent.mkdir()
    subprocess.run([sys.executable, str(REPO / "scripts" / "demo_fit_data.py"), "--out", str(data)], check=True)
    subprocess.run([sys.executable, "-m", "unipool_serve.tools.steering_cli", "probe", "--model",
                    str(model), "--data", str(data), "--name", "code", "--out", str(out),
                    "--label-1", "code", "--label-0", "prose", "--description",
                    "code prompts of the demo corpus (its calibration split)", "--no-progress"], check=True)
    return out


def serve(model: Path, probe_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "unipool_serve.server.cli", "--model", str(model),
                             "--probe-dir", str(probe_dir), "--dtype", "float32",
                             "--enforce-eager", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"unipool-serve exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)


def complete(url: str, served: str, prompt: str, steering) -> tuple[str, dict]:
    body = {"model": served, "prompt": prompt, "max_tokens": TOKENS, "min_tokens": TOKENS, "temperature": 0,
            "probes": ["code"]}
    if steering is not None:
        body["steering"] = steering
    answer = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    answer.raise_for_status()
    choice = answer.json()["choices"][0]
    return choice["text"], choice["probe_scores"]["code"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probe", type=Path, help="a fitted probe of the demo model (default: fit one now)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--model", type=Path, default=DEMO, help="model folder (default: the demo model)")
    parser.add_argument("--profile", default="prose", help="the profile to gate, from the model's steering/ (default prose)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="demo-probe-"))
    probe_path = args.probe or fit(work, args.model)
    probe_dir = probe_path.parent if args.probe is None else work / "probes"
    if args.probe is not None:
        probe_dir.mkdir()
        (probe_dir / "code.safetensors").write_bytes(args.probe.read_bytes())
    proc, url = serve(args.model, probe_dir, work / "server.log")
    try:
        prompts = [(p, 1) for p in PROMPTS_CODE] + [(p, 0) for p in PROMPTS_PROSE]
        runs = {}
        served = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        for name, steering in (("unsteered", None), (args.profile, args.profile),
                               (f"{args.profile} gated by the probe", {"profile": args.profile, "when": "code"})):
            runs[name] = [complete(url, served, prompt, steering) for prompt, _ in prompts]
            print(f"{name}: done", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    labels = np.array([label for _, label in prompts])
    scores = np.array([s["score"] for _, s in runs["unsteered"]])
    fired = np.array([s["fired"] for _, s in runs["unsteered"]])
    probe = RoutingProbe.load(probe_dir / "code.safetensors")
    detection = {"auroc": round(auroc(scores, labels), 4), "tpr": round(float(fired[labels == 1].mean()), 4),
                 "fpr": round(float(fired[labels == 0].mean()), 4), "threshold": probe.threshold,
                 "fit": (probe.provenance or {}).get("metrics")}
    rows = []
    for name, outs in runs.items():
        kinds = [classify(text) for text, _ in outs]
        rows.append({"steering": name,
                     "code_share_of_code_prompts": round(float(np.mean([k == "code" for k, l in zip(kinds, labels) if l])), 4),
                     "prose_share_of_prose_prompts": round(float(np.mean([k == "prose" for k, l in zip(kinds, labels)
                                                                          if not l])), 4),
                     "identical_to_unsteered": {"code": sum(a[0] == b[0] for a, b, l in zip(outs, runs["unsteered"], labels) if l),
                                                "prose": sum(a[0] == b[0] for a, b, l in zip(outs, runs["unsteered"], labels)
                                                             if not l)}})
    print(f"probe on the held-out prompts: AUROC {detection['auroc']:.3f}, TPR {detection['tpr']:.1%}, "
          f"FPR {detection['fpr']:.1%}")
    print("| steering | code prompts left code | prose prompts kept prose | identical to unsteered (code / prose) |")
    print("|---|---|---|---|")
    for r in rows:
        same = r["identical_to_unsteered"]
        print(f"| {r['steering']} | {r['code_share_of_code_prompts']:.0%} | {r['prose_share_of_prose_prompts']:.0%} | "
              f"{same['code']}/40 / {same['prose']}/40 |")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "profile": args.profile,
                                         "prompts": {"code": len(PROMPTS_CODE), "prose": len(PROMPTS_PROSE)},
                                         "detection": detection, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
