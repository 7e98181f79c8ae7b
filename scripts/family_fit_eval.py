#!/usr/bin/env python
"""Fit a profile for small trained models of vLLM's families through unipool-serve, and measure it
(docs/fitting-profiles.md, "vLLM's families, end to end").

For each architecture (default: Mixtral and Qwen3-MoE):
  1. train a small model of that family with transformers' own classes, from scratch on CPU, for
     --minutes on the demo corpus's two domains (prose and Python-like code, demo/corpus.py;
     byte-level BPE trained on the same documents), the LM loss plus transformers' router
     load-balancing loss;
  2. serve it with unipool-serve (vLLM CPU build, fp32, eager);
  3. `unipool-steering fit --server` a `prose` profile: label 1 the code prompts, label 0 the
     prose prompts of the corpus's calibration split (as scripts/demo_fit_data.py writes them),
     judged by the demo classifier through the server;
  4. measure on the demo's fixed held-out prompts (40 code, 40 prose; demo/eval.py), greedy, 32
     new tokens, end of text banned, through the server: the code share of the code prompts'
     continuations and the prose share of the prose prompts', unsteered, under the fitted profile
     and under three random controls of it (per layer the same bias values and the same number of
     exclusions on experts drawn at random, the same alpha; demo.eval.random_like).
Writes one JSON per architecture and prints a Markdown table each.

    .venv/bin/python scripts/family_fit_eval.py --out-dir /tmp/family-fit --json-dir docs/results
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import torch  # noqa: E402

from unipool_serve.demo.classifier import classify  # noqa: E402
from unipool_serve.demo.corpus import CALIBRATION_SEED, TRAIN_SEED, documents  # noqa: E402
from unipool_serve.demo.eval import PROMPTS_CODE, PROMPTS_PROSE, make_prompts, random_like  # noqa: E402
from unipool_serve.demo.tokenizer import BOS_ID, EOS_ID, PAD_ID, train_tokenizer  # noqa: E402
from unipool_serve.model_executor.steering.profile import SteeringProfile  # noqa: E402
from unipool_serve.model_executor.steering.shape import SteerableModel  # noqa: E402

# architecture -> (transformers config class, its fields): small, vLLM-CPU friendly widths
SHAPES = {
    "MixtralForCausalLM": ("MixtralConfig", dict(num_local_experts=8, intermediate_size=128)),
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", dict(num_experts=8, moe_intermediate_size=128, intermediate_size=256,
                                                   norm_topk_prob=True)),
}
COMMON = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
              num_experts_per_tok=2, max_position_embeddings=512, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
              eos_token_id=EOS_ID, tie_word_embeddings=False, output_router_logits=True, router_aux_loss_coef=0.01)
API_KEY, ADMIN_KEY, NAME = "eval-user", "eval-admin", "prose-fit"
JUDGE = "callable:unipool_serve.demo.classifier:classify=code"
NEW_TOKENS, CONTROL_SEEDS = 32, (0, 1, 2)


# ---- 1. train ------------------------------------------------------------------------------
def train(architecture: str, folder: Path, minutes: float, seed: int, log) -> dict:
    import transformers

    random.seed(seed)
    torch.manual_seed(seed)
    docs = documents("prose", 600, TRAIN_SEED) + documents("code", 600, TRAIN_SEED)
    tokenizer = train_tokenizer(docs, 1024)
    class_name, fields = SHAPES[architecture]
    config = getattr(transformers, class_name)(vocab_size=((len(tokenizer) + 31) // 32) * 32, **COMMON, **fields)
    config.architectures = [architecture]
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    stream = []
    for doc in docs:
        stream += [BOS_ID, *tokenizer(doc, add_special_tokens=False)["input_ids"], EOS_ID]
    data = torch.tensor(stream)
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    window, batch, steps, start = 128, 16, 0, time.monotonic()
    generator = torch.Generator().manual_seed(seed)
    model.train()
    while time.monotonic() - start < minutes * 60:
        offsets = torch.randint(0, len(data) - window - 1, (batch,), generator=generator)
        x = torch.stack([data[o:o + window] for o in offsets])
        out = model(input_ids=x, labels=x)
        optimiser.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        steps += 1
        if steps % 50 == 0:
            log(f"  step {steps}: loss {out.loss.item():.3f} ({time.monotonic() - start:.0f} s)")
    model.eval()
    model.config.output_router_logits = False
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return {"steps": steps, "final_loss": round(out.loss.item(), 4), "train_seconds": round(time.monotonic() - start),
            "tokens_per_step": window * batch, "corpus_documents": len(docs), "vocab": config.vocab_size}


# ---- 2. serve ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(folder: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "unipool_serve.server.cli", "--model", str(folder), "--steering-dir",
           str(folder / "steering"), "--api-key", API_KEY, "--admin-key", ADMIN_KEY, "--dtype", "float32",
           "--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "8", "--served-model-name", "m",
           "--host", "127.0.0.1", "--port", str(port)]
    (folder / "steering").mkdir(exist_ok=True)
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"unipool-serve exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError(f"unipool-serve not ready in 600 s; see {log_path}")


# ---- 3. fit --------------------------------------------------------------------------------
def fit_data(path: Path, per_kind: int) -> None:
    """As scripts/demo_fit_data.py: calibration-split prompts, the held-out ones never among them."""
    held_out = set(PROMPTS_CODE) | set(PROMPTS_PROSE)
    code = [p for p in make_prompts("code", per_kind, seed=CALIBRATION_SEED) if p not in held_out]
    prose = [p for p in make_prompts("prose", per_kind, seed=CALIBRATION_SEED) if p not in held_out]
    path.write_text("".join(json.dumps({"prompt": c, "label": 1}) + "\n" + json.dumps({"prompt": p, "label": 0})
                            + "\n" for c, p in zip(code, prose)))


def fit(folder: Path, url: str, data: Path, out: Path) -> tuple[list[str], str, float]:
    cmd = [sys.executable, "-m", "unipool_serve.tools.steering_cli", "fit", "--model", str(folder), "--server", url,
           "--api-key", API_KEY, "--admin-key", ADMIN_KEY, "--data", str(data), "--name", NAME, "--out", str(out),
           "--judge", JUDGE, "--lambda", "1e-2", "--alpha", "2", "4", "8", "--threads", "1", "--no-progress"]
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"fit failed: {done.stderr.strip()}")
    return cmd[1:], done.stdout, time.monotonic() - start


# ---- 4. measure ----------------------------------------------------------------------------
def continuations(http: httpx.Client, prompts: list[str], profile: str | None) -> list[str]:
    texts = []
    for prompt in prompts:
        body = {"model": "m", "prompt": prompt, "max_tokens": NEW_TOKENS, "min_tokens": NEW_TOKENS, "temperature": 0}
        if profile:
            body["steering"] = profile
        answer = http.post("/v1/completions", json=body)
        answer.raise_for_status()
        texts.append(answer.json()["choices"][0]["text"])
    return texts


def control(profile: SteeringProfile, seed: int) -> SteeringProfile:
    bias, mask = random_like(profile.bias, profile.mask_rows(), seed)
    include = {l: [e for e in range(mask.shape[1]) if mask[l, e] == 1] for l in range(mask.shape[0])}
    exclude = {l: [e for e in range(mask.shape[1]) if mask[l, e] == -1] for l in range(mask.shape[0])}
    return dataclasses.replace(profile, name=f"{NAME}.random-{seed}", bias=bias,
                               include={l: v for l, v in include.items() if v},
                               exclude={l: v for l, v in exclude.items() if v}, provenance=None)


def measure(url: str, fitted: SteeringProfile, log) -> list[dict]:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300)
    rows = []
    steerings = [("unsteered", None), (f"fitted `{NAME}`", fitted),
                 *((f"random control, seed {s}", control(fitted, s)) for s in CONTROL_SEEDS)]
    for label, profile in steerings:
        if profile is not None:
            r = httpx.post(f"{url}/v1/steering/profiles?replace=true", content=profile.to_bytes(), headers=admin,
                           timeout=60)
            r.raise_for_status()
        name = None if profile is None else profile.name
        code = [classify(t) for t in continuations(http, PROMPTS_CODE, name)]
        prose = [classify(t) for t in continuations(http, PROMPTS_PROSE, name)]
        rows.append({"steering": label, "nonzero_bias": 0 if profile is None else int((profile.bias != 0).sum()),
                     "exclusions": 0 if profile is None else sum(map(len, profile.exclude.values())),
                     "code_share_of_code_prompts": code.count("code") / len(code),
                     "prose_share_of_prose_prompts": prose.count("prose") / len(prose)})
        log(f"  {label}: code {rows[-1]['code_share_of_code_prompts']:.0%}, "
            f"prose {rows[-1]['prose_share_of_prose_prompts']:.0%}")
    http.close()
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"| steering | nonzero S | exclusions | code share, {len(PROMPTS_CODE)} code prompts | "
             f"prose share, {len(PROMPTS_PROSE)} prose prompts |", "|---|---|---|---|---|"]
    lines += [f"| {r['steering']} | {r['nonzero_bias']} | {r['exclusions']} | {r['code_share_of_code_prompts']:.0%} | "
              f"{r['prose_share_of_prose_prompts']:.0%} |" for r in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_one(architecture: str, args, log) -> dict:
    folder = args.out_dir / architecture
    folder.mkdir(parents=True, exist_ok=True)
    log(f"{architecture}: training for {args.minutes} min")
    trained = train(architecture, folder, args.minutes, args.seed, log)
    shape = SteerableModel.from_folder(folder)
    data = args.out_dir / f"{architecture}-fit.jsonl"
    fit_data(data, args.per_kind)
    proc, url = serve(folder, args.out_dir / f"{architecture}-server.log")
    try:
        log(f"{architecture}: serving at {url}; fitting through it")
        out = args.out_dir / f"{architecture}-{NAME}.safetensors"
        command, printed, fit_seconds = fit(folder, url, data, out)
        fitted = SteeringProfile.load(out, shape)
        log(printed)
        rows = measure(url, fitted, log)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    made = fitted.provenance
    return {"architecture": architecture, "fingerprint": shape.fingerprint,
            "model": {**{k: v for k, v in COMMON.items() if k.startswith(("hidden", "num_", "head"))},
                      **SHAPES[architecture][1]},
            "training": trained, "fit": {"command": " ".join(command), "seconds": round(fit_seconds),
                                         "kind": made.get("kind"), "bias": made.get("bias"), "lambda": made.get("lambda"),
                                         "alpha": made.get("alpha"), "nonzero": made.get("nonzero"),
                                         "excluded": made.get("excluded"), "surrogate": made.get("surrogate"),
                                         "evaluation": made.get("evaluation"), "printed": printed},
            "held_out": {"prompts": {"code": len(PROMPTS_CODE), "prose": len(PROMPTS_PROSE)},
                         "new_tokens": NEW_TOKENS, "rows": rows},
            "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(),
                        "load_average": os.getloadavg()}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out-dir", type=Path, required=True, help="models, data, fitted profiles, server logs")
    parser.add_argument("--json-dir", type=Path, help="write family-fit-<arch>.json here")
    parser.add_argument("--minutes", type=float, default=4.0, help="training time per model (default 4)")
    parser.add_argument("--per-kind", type=int, default=100, help="fit prompts of each kind (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(message, flush=True)

    for architecture in args.arch:
        result = run_one(architecture, args, log)
        result["command"] = " ".join(["scripts/family_fit_eval.py", *sys.argv[1:]])
        print(f"\n{architecture}\n{table(result['held_out']['rows'])}\n", flush=True)
        if args.json_dir:
            path = args.json_dir / f"family-fit-{architecture}.json"
            path.write_text(json.dumps(result, indent=2) + "\n")
            log(f"wrote {path}")


if __name__ == "__main__":
    main()
