#!/usr/bin/env python
"""Train the bundled demo model (models/unipool-demo) from scratch on CPU, reproducibly.

    .venv/bin/python scripts/train_demo_model.py --out models/unipool-demo

Stages (all seeded; nothing is downloaded):
  1. corpus: prose and Python-like code from the grammars in demo/corpus.py;
  2. tokenizer: byte-level BPE (model_executor.tokenizer.train_tokenizer);
  3. model: a UniPool decoder (one global pool of 16 NormRouter top-1 experts shared by 4
     layers) trained with the LM loss plus the pool-level balancing loss
     (M * sum_i f_i * P_i, f and P averaged over all layers before the product);
  4. evaluation: classifier accuracy on held-out corpus text, the two behaviours, the
     per-expert load, steering profiles derived from the model's own routing
     (expert activation rates on prose vs code), their measured effect against random
     controls of the same size; written to README.md, metadata.json and steering/.

`--skip-training` reruns stage 4 on the weights already in --out (the stages before
it are deterministic, so this gives the same folder as a full run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from unipool_serve.demo import eval as demo_eval  # noqa: E402
from unipool_serve.model_executor.config import UniPoolConfig  # noqa: E402
from unipool_serve.demo.classifier import classify  # noqa: E402
from unipool_serve.demo.corpus import HELDOUT_SEED, TRAIN_SEED, CALIBRATION_SEED, documents  # noqa: E402
from unipool_serve.model_executor.reference.model import UniPoolForCausalLM  # noqa: E402
from unipool_serve.demo.tokenizer import BOS_ID, EOS_ID, PAD_ID, train_tokenizer  # noqa: E402

MODEL_SHAPE = dict(
    hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    max_position_embeddings=512, num_experts=16, num_experts_per_tok=1, expert_intermediate_size=256,
    layers_per_pool=4, layers_per_router=1, router_type="norm", initializer_range=0.02,
    pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
)
ALPHAS = (1.0, 2.0, 4.0)  # profile strengths tried on the calibration prompts
PROFILE_THRESHOLD = 0.1  # MASCing-style sparsification: |S| <= 0.1 -> 0
CONTROL_SEEDS = (0, 1, 2)
HASH_STEPS = (10, 20, 50, 100)  # parameter hashes logged before these steps (reproducibility checks)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="models/unipool-demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (fixed for reproducibility; 1 is also fastest on a shared machine)")
    p.add_argument("--docs", type=int, default=12000, help="training documents per kind")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--aux-coef", type=float, default=0.02, help="weight of the pool-level balancing loss")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps (same schedule as --steps): for reproducibility checks")
    p.add_argument("--skip-training", action="store_true", help="reuse the weights in --out; rerun the evaluation")
    p.add_argument("--no-eval", action="store_true", help="stop after saving model and tokenizer")
    return p.parse_args(argv)


def set_determinism(seed: int, threads: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


# ---------------------------------------------------------------- data
def build_corpus(n_docs: int, seed: int) -> list[str]:
    docs = documents("prose", n_docs, TRAIN_SEED) + documents("code", n_docs, TRAIN_SEED)
    random.Random(seed).shuffle(docs)
    return docs


def token_windows(tokenizer, docs: list[str], seq: int) -> torch.Tensor:
    """Documents joined with </s> into one stream, cut into [W, seq+1] windows."""
    stream: list[int] = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(EOS_ID)
    n = len(stream) // (seq + 1)
    return torch.tensor(stream[: n * (seq + 1)], dtype=torch.long).view(n, seq + 1)


# ---------------------------------------------------------------- losses
def pool_balance_loss(model: UniPoolForCausalLM, router_logits) -> tuple[torch.Tensor, torch.Tensor]:
    """UniPool's pool-level balancing loss and the per-expert token fraction f (averaged over layers).

    Per layer l: f_l,i = share of the layer's token slots routed to expert i (from `route`,
    not differentiable); P_l,i = mean over tokens of the NormRouter score of expert i,
    normalised per token to sum to 1 (`PoolRouter.scores`). Then f and P are averaged over
    all layers (the pool is shared by all of them) and loss = M * sum_i f_i * P_i,
    which is 1 when the pool is used uniformly.
    """
    cfg = model.config
    fs, ps = [], []
    for layer, logits in enumerate(router_logits):
        router = model.model.routers[cfg.layer_to_router(layer)]
        scores = router.scores(logits)  # [T, E]
        probs = scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        with torch.no_grad():
            ids, _ = router.route(logits.detach(), layer, None)
            f = torch.bincount(ids.reshape(-1).long(), minlength=cfg.num_experts).float() / ids.numel()
        fs.append(f)
        ps.append(probs.mean(dim=0))
    f_pool, p_pool = torch.stack(fs).mean(0), torch.stack(ps).mean(0)
    return cfg.num_experts * (f_pool * p_pool).sum(), f_pool


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args, out: Path) -> dict:
    set_determinism(args.seed, args.threads)
    t0 = time.time()
    docs = build_corpus(args.docs, args.seed)
    tokenizer = train_tokenizer(docs, args.vocab)
    windows = token_windows(tokenizer, docs, args.seq)
    print(f"corpus: {len(docs)} documents, {windows.numel()} tokens in {len(windows)} windows; "
          f"tokenizer {len(tokenizer)} tokens ({time.time() - t0:.1f}s)", flush=True)

    vocab = ((len(tokenizer) + 31) // 32) * 32
    config = UniPoolConfig(vocab_size=vocab, **MODEL_SHAPE)
    torch.manual_seed(args.seed)
    model = UniPoolForCausalLM(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

    gen = torch.Generator().manual_seed(args.seed)
    order = torch.empty(0, dtype=torch.long)
    log = []
    step_hashes = {}
    bar = tqdm(range(args.steps), desc="train", mininterval=5.0, file=sys.stdout)
    for step in bar:
        if args.stop_after is not None and step >= args.stop_after:
            break
        if step in HASH_STEPS:
            step_hashes[step] = state_hash(model)
        if len(order) < args.batch:
            order = torch.cat([order, torch.randperm(len(windows), generator=gen)])
        idx, order = order[: args.batch], order[args.batch:]
        batch = windows[idx]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        out_ = model(input_ids=batch[:, :-1], output_router_logits=True)
        lm = F.cross_entropy(out_.logits.reshape(-1, vocab), batch[:, 1:].reshape(-1))
        aux, f_pool = pool_balance_loss(model, out_["router_logits"])
        loss = lm + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(lm=f"{lm.item():.3f}", aux=f"{aux.item():.3f}", refresh=False)
        if step % 25 == 0 or step == args.steps - 1:
            log.append({"step": step, "lm_loss": round(lm.item(), 4), "balance_loss": round(aux.item(), 4),
                        "max_expert_share": round(f_pool.max().item(), 4)})
            tqdm.write(f"step {step:4d}  lm {lm.item():.4f}  balance {aux.item():.4f}  "
                       f"max expert share {f_pool.max().item():.3f}  lr {opt.param_groups[0]['lr']:.2e}")
    train_seconds = time.time() - t0
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    info = {
        "steps": args.steps, "batch": args.batch, "seq": args.seq, "tokens_seen": args.steps * args.batch * args.seq,
        "corpus_tokens": windows.numel(), "documents_per_kind": args.docs, "lr": args.lr, "warmup": args.warmup,
        "weight_decay": args.weight_decay, "aux_coef": args.aux_coef, "seed": args.seed, "threads": args.threads,
        "final_lm_loss": log[-1]["lm_loss"], "final_balance_loss": log[-1]["balance_loss"],
        "wall_seconds": round(train_seconds, 1), "stopped_after": args.stop_after,
        "tokenizer_sha256": hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest(),
        "state_sha256_before_step": step_hashes, "loss_log": log,
    }
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"trained in {train_seconds:.0f}s; weights sha256 {weights_hash(out)}", flush=True)
    return info


def state_hash(model) -> str:
    """sha256 over the model's sorted parameter names and fp32 bytes (a training-time fingerprint)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def corpus_hash(n_docs: int, seed: int) -> str:
    """sha256 of the training corpus in training order (guards the grammar the weights came from)."""
    return hashlib.sha256("\x00".join(build_corpus(n_docs, seed)).encode()).hexdigest()


def prompts_hash() -> str:
    """sha256 of the fixed evaluation and calibration prompt sets."""
    sets = (demo_eval.PROMPTS_CODE, demo_eval.PROMPTS_PROSE, demo_eval.CALIBRATION_CODE, demo_eval.CALIBRATION_PROSE)
    return hashlib.sha256(json.dumps(sets).encode()).hexdigest()


def weights_hash(out: Path) -> str:
    from safetensors.torch import load_file

    tensors = load_file(str(out / "model.safetensors"))
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- evaluation
def classifier_accuracy(tokenizer) -> dict:
    """Accuracy of `classify` on held-out documents and on 32-token windows of them."""
    res = {}
    for kind in ("prose", "code"):
        docs = documents(kind, 300, HELDOUT_SEED)
        whole = sum(classify(d) == kind for d in docs) / len(docs)
        hits = total = 0
        for d in docs:
            ids = tokenizer(d, add_special_tokens=False)["input_ids"]
            for i in range(0, len(ids) - 32 + 1, 32):
                hits += classify(tokenizer.decode(ids[i:i + 32])) == kind
                total += 1
        res[kind] = {"documents": len(docs), "document_accuracy": whole, "windows_32tok": total,
                     "window_accuracy": hits / total}
    return res


def derive_profile(rate_from: torch.Tensor, rate_to: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Steer toward the kind with activation rates `rate_to`, away from `rate_from` ([L, E] each).

    bias S (MASCing-style, unscaled): the risk difference rate_to - rate_from, divided by
    its largest magnitude in the layer, entries with |S| <= 0.1 zeroed.
    mask (SteerMoE-style): per layer, exclude the experts whose activation rate on the
    steered-away kind is at least twice that on the target kind and at least 1/E.
    """
    diff = rate_to - rate_from
    bias = diff / diff.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    bias = torch.where(bias.abs() <= PROFILE_THRESHOLD, torch.zeros_like(bias), bias).float()
    num_experts = rate_to.shape[1]
    exclude = (rate_from >= 2 * rate_to) & (rate_from >= 1.0 / num_experts)
    mask = torch.zeros_like(bias, dtype=torch.int8)
    mask[exclude] = -1
    return bias, mask


def nonzero_layout(bias: torch.Tensor | None, mask: torch.Tensor | None) -> dict:
    d = {}
    if bias is not None:
        d["bias_nonzero"] = int((bias != 0).sum())
    if mask is not None:
        d["excluded"] = int((mask == -1).sum())
        d["included"] = int((mask == 1).sum())
    return d


def evaluate(out: Path, train_info: dict | None) -> dict:
    model, tokenizer = demo_eval.load_demo(out)
    cfg = model.config
    report: dict = {"weights_sha256": weights_hash(out)}
    if train_info is not None:
        report["training"] = {k: v for k, v in train_info.items() if k != "loss_log"}
    elif (out / "training.json").exists():
        report["training"] = {k: v for k, v in json.loads((out / "training.json").read_text()).items() if k != "loss_log"}

    report["corpus_sha256"] = corpus_hash(report.get("training", {}).get("documents_per_kind", 12000),
                                          report.get("training", {}).get("seed", 0))
    report["prompts_sha256"] = prompts_hash()
    print("classifier accuracy on held-out corpus text ...", flush=True)
    report["classifier"] = classifier_accuracy(tokenizer)
    print(json.dumps(report["classifier"], indent=1), flush=True)

    print("behaviours (unsteered) ...", flush=True)
    report["behaviour"] = {
        "code_prompts": demo_eval.measure(model, tokenizer, demo_eval.PROMPTS_CODE),
        "prose_prompts": demo_eval.measure(model, tokenizer, demo_eval.PROMPTS_PROSE),
    }
    print(json.dumps(report["behaviour"], indent=1), flush=True)
    report["samples"] = {
        "code": [{"prompt": p, "continuation": c} for p, c in zip(
            demo_eval.PROMPTS_CODE[:3], demo_eval.greedy_continuations(model, tokenizer, demo_eval.PROMPTS_CODE[:3]))],
        "prose": [{"prompt": p, "continuation": c} for p, c in zip(
            demo_eval.PROMPTS_PROSE[:3], demo_eval.greedy_continuations(model, tokenizer, demo_eval.PROMPTS_PROSE[:3]))],
    }

    print("routing statistics ...", flush=True)
    cal_prose = documents("prose", 200, CALIBRATION_SEED)
    cal_code = documents("code", 200, CALIBRATION_SEED)
    rate_prose = demo_eval.routing_rates(model, tokenizer, cal_prose)
    rate_code = demo_eval.routing_rates(model, tokenizer, cal_code)
    held = documents("prose", 100, HELDOUT_SEED) + documents("code", 100, HELDOUT_SEED)
    load = demo_eval.routing_rates(model, tokenizer, held)  # [L, E]
    report["expert_load"] = {
        "per_layer": [[round(x, 4) for x in row.tolist()] for row in load],
        "pool": [round(x, 4) for x in load.mean(0).tolist()],
        "rate_prose": [[round(x, 4) for x in row.tolist()] for row in rate_prose],
        "rate_code": [[round(x, 4) for x in row.tolist()] for row in rate_code],
    }

    print("per-expert load (share of tokens; rows = layers, last row = pool):", flush=True)
    for name, row in [(f"layer {l}", r) for l, r in enumerate(report["expert_load"]["per_layer"])] + [
            ("pool", report["expert_load"]["pool"])]:
        print(f"  {name:8s} " + " ".join(f"{x:.3f}" for x in row), flush=True)

    profiles = {}
    for target, (r_from, r_to), cal_prompts in (
        ("prose", (rate_code, rate_prose), demo_eval.CALIBRATION_CODE),
        ("code", (rate_prose, rate_code), demo_eval.CALIBRATION_PROSE),
    ):
        bias, mask = derive_profile(r_from, r_to)
        # strength: the alpha (bias) with the largest target share on the calibration prompts,
        # the mask always applied; ties go to the smaller alpha.
        best = None
        calib = {}
        for alpha in ALPHAS:
            share = demo_eval.measure(model, tokenizer, cal_prompts, bias_rows=alpha * bias, mask_rows=mask)[target]
            calib[alpha] = share
            if best is None or share > calib[best] + 1e-9:
                best = alpha
        profiles[target] = {"bias": bias, "mask": mask, "alpha": best, "calibration": calib}
        print(f"profile {target}: calibration shares by alpha {calib} -> alpha {best}", flush=True)

    save_profiles(out, cfg, profiles)
    print("steering effect on the fixed prompt sets (profiles as loaded from steering/) ...", flush=True)
    from unipool_serve.model_executor.steering.profile import SteeringProfile

    table = {}
    loaded = {}
    for target, prompts, away in (("prose", demo_eval.PROMPTS_CODE, "code"), ("code", demo_eval.PROMPTS_PROSE, "prose")):
        prof = loaded[target] = SteeringProfile.load(out / "steering" / f"{target}.safetensors", cfg)
        alpha, bias, mask = prof.alpha, prof.bias, prof.mask_rows()
        rows = {"none": demo_eval.measure(model, tokenizer, prompts)}
        rows["profile (bias+mask)"] = demo_eval.measure(model, tokenizer, prompts, bias_rows=prof.bias_rows(),
                                                        mask_rows=mask)
        rows["bias only"] = demo_eval.measure(model, tokenizer, prompts, bias_rows=prof.bias_rows())
        rows["mask only"] = demo_eval.measure(model, tokenizer, prompts, mask_rows=mask)
        controls = []
        for seed in CONTROL_SEEDS:
            rb, rm = demo_eval.random_like(bias, mask, seed)
            controls.append(demo_eval.measure(model, tokenizer, prompts, bias_rows=alpha * rb, mask_rows=rm))
        rows["random control (mean of 3)"] = {k: sum(c[k] for c in controls) / len(controls) for k in controls[0]}
        for i, c in enumerate(controls):
            rows[f"random control seed {CONTROL_SEEDS[i]}"] = c
        table[target] = {"prompts": f"{len(prompts)} {away} prompts", "away": away, "alpha": alpha,
                         "layout": nonzero_layout(bias, mask), "rows": rows,
                         "calibration": {str(a): s for a, s in profiles[target]["calibration"].items()}}
        print(json.dumps(table[target], indent=1), flush=True)
    report["steering"] = table
    report["steered_samples"] = [
        {"prompt": p, "continuation": c} for p, c in zip(demo_eval.PROMPTS_CODE[:3], demo_eval.greedy_continuations(
            model, tokenizer, demo_eval.PROMPTS_CODE[:3],
            bias_rows=loaded["prose"].bias_rows(), mask_rows=loaded["prose"].mask_rows()))
    ]
    (out / "metadata.json").write_text(json.dumps(report, indent=1) + "\n")
    write_readme(out, cfg, report)
    return report


DESCRIPTIONS = {
    "prose": "Steers the demo model toward English-like prose: bias from the per-layer risk difference of "
             "expert activation (prose minus code), code-dominant experts excluded.",
    "code": "Steers the demo model toward Python-like code: bias from the per-layer risk difference of "
            "expert activation (code minus prose), prose-dominant experts excluded.",
}


def _mask_dicts(mask: torch.Tensor) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    include = {l: [int(e) for e in (mask[l] == 1).nonzero().flatten()] for l in range(mask.shape[0])}
    exclude = {l: [int(e) for e in (mask[l] == -1).nonzero().flatten()] for l in range(mask.shape[0])}
    return {l: v for l, v in include.items() if v}, {l: v for l, v in exclude.items() if v}


def save_profiles(out: Path, cfg: UniPoolConfig, profiles: dict) -> None:
    from unipool_serve.model_executor.steering.profile import SteeringProfile

    steering_dir = out / "steering"
    steering_dir.mkdir(exist_ok=True)
    for name, prof in profiles.items():
        include, exclude = _mask_dicts(prof["mask"])
        path = steering_dir / f"{name}.safetensors"
        profile = SteeringProfile.for_config(cfg, name=name, bias=prof["bias"], alpha=float(prof["alpha"]),
                                             include=include, exclude=exclude, description=DESCRIPTIONS[name])
        profile.save(path)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def write_readme(out: Path, cfg: UniPoolConfig, r: dict) -> None:
    tr = r.get("training", {})
    lines = [
        "# unipool-demo",
        "",
        "A small UniPool model (one global pool of experts shared by every layer) trained from scratch on a",
        "synthetic corpus of two kinds of text: English-like prose and Python-like code, both from small",
        "grammars (demo/corpus.py). It is the default model of the server and the",
        "demonstration that per-request router steering changes behaviour. Everything in this folder is",
        "written by `scripts/train_demo_model.py` (see docs/demo-model.md):",
        "",
        "    .venv/bin/python scripts/train_demo_model.py --out models/unipool-demo",
        "",
        "## Shape",
        "",
        f"- {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads "
        f"(head_dim {cfg.head_dim}), {cfg.num_key_value_heads} KV heads, vocab {cfg.vocab_size} (byte-level BPE)",
        f"- one global pool of {cfg.num_experts} SwiGLU experts of width {cfg.expert_intermediate_size}; "
        f"every layer has its own NormRouter, top-{cfg.num_experts_per_tok}",
        "- weights fp32 (model.safetensors); router logits fp32",
        "",
        "## Training",
        "",
    ]
    if tr:
        lines += [
            f"- {tr['steps']} AdamW steps, batch {tr['batch']} x {tr['seq']} tokens ({tr['tokens_seen']:,} tokens seen; "
            f"corpus {tr['corpus_tokens']:,} tokens), lr {tr['lr']} cosine to 10% after {tr['warmup']} warm-up steps, "
            f"weight decay {tr['weight_decay']}",
            f"- pool-level balancing loss (f and P averaged over all layers, then M * sum f_i P_i), weight {tr['aux_coef']}",
            f"- seed {tr['seed']}, {tr['threads']} torch threads, deterministic algorithms; "
            f"{tr['wall_seconds']:.0f} s wall time on the machine that wrote this folder",
            f"- final LM loss {tr['final_lm_loss']}, final balancing loss {tr['final_balance_loss']} (1.0 = uniform)",
        ]
    lines += [f"- weights sha256 (over sorted tensor names and bytes): `{r['weights_sha256']}`", ""]

    load = r["expert_load"]
    lines += ["## Per-expert load", "",
              "Share of tokens routed to each expert on 100 held-out prose + 100 held-out code documents "
              "(uniform = " + f"{1 / cfg.num_experts:.3f}).", "",
              "| layer | " + " | ".join(f"e{e}" for e in range(cfg.num_experts)) + " |",
              "|---|" + "---|" * cfg.num_experts]
    for l, row in enumerate(load["per_layer"]):
        lines.append(f"| {l} | " + " | ".join(f"{x:.2f}" for x in row) + " |")
    lines.append("| pool | " + " | ".join(f"{x:.2f}" for x in load["pool"]) + " |")
    lines.append("")

    c = r["classifier"]
    lines += ["## Classifier (demo/classifier.py)", "",
              "Counts code markers (brackets, `=`, `:`, keywords, indentation) against prose markers "
              "(English function words, sentence ends). Accuracy on held-out corpus text:", "",
              "| kind | whole documents | 32-token windows |", "|---|---|---|"]
    for kind in ("prose", "code"):
        lines.append(f"| {kind} | {_pct(c[kind]['document_accuracy'])} of {c[kind]['documents']} | "
                     f"{100 * c[kind]['window_accuracy']:.1f}% of {c[kind]['windows_32tok']} |")
    lines.append("")

    b = r["behaviour"]
    lines += ["## Behaviours (reference model, greedy, 32 new tokens)", "",
              "| prompts | classified prose | classified code | other |", "|---|---|---|---|",
              f"| 40 code prompts | {_pct(b['code_prompts']['prose'])} | {_pct(b['code_prompts']['code'])} | {_pct(b['code_prompts']['other'])} |",
              f"| 40 prose prompts | {_pct(b['prose_prompts']['prose'])} | {_pct(b['prose_prompts']['code'])} | {_pct(b['prose_prompts']['other'])} |",
              "", "Samples:", ""]
    for kind in ("code", "prose"):
        for s in r["samples"][kind][:2]:
            lines += ["```", s["prompt"] + "⟨" + s["continuation"] + "⟩", "```"]
    lines.append("")

    lines += ["## Steering profiles (steering/)", "",
              "Derived from the model's own routing: per layer, each expert's top-1 activation rate on 200 "
              "calibration prose documents vs 200 calibration code documents. `bias` = risk difference "
              "(target minus other kind) scaled to [-1, 1] per layer, |S| <= 0.1 zeroed (MASCing-style, "
              "applied as alpha * sigma_token * S); `exclude` = experts at least twice as active on the "
              "other kind and above 1/E (SteerMoE-style). alpha was chosen on separate calibration prompts. "
              "Random controls: per layer the same bias values and the same number of excludes on experts "
              "drawn at random (3 seeds).", ""]
    for target, t in r["steering"].items():
        lay = t["layout"]
        lines += [f"### `{target}` on {t['prompts']} (alpha {t['alpha']}; {lay['bias_nonzero']} nonzero bias entries, "
                  f"{lay['excluded']} exclusions, {lay['included']} inclusions over {cfg.num_hidden_layers} x "
                  f"{cfg.num_experts})", "",
                  "| steering | classified prose | classified code | other |", "|---|---|---|---|"]
        for name, row in t["rows"].items():
            lines.append(f"| {name} | {_pct(row['prose'])} | {_pct(row['code'])} | {_pct(row['other'])} |")
        lines.append("")
    pr, co = r["steering"]["prose"]["rows"], r["steering"]["code"]["rows"]
    ctl = lambda rows, k: ", ".join(_pct(rows[f"random control seed {s}"][k]) for s in CONTROL_SEEDS)  # noqa: E731
    lines += [
        "### Reading the tables", "",
        f"- `prose` on code prompts: code {_pct(pr['none']['code'])} -> {_pct(pr['profile (bias+mask)']['code'])}; "
        f"the random controls of the same size leave code at {ctl(pr, 'code')}. The profile needs its bias and its "
        f"exclusions together: bias alone gives {_pct(pr['bias only']['code'])} code, exclusions alone "
        f"{_pct(pr['mask only']['code'])}.",
        f"- `code` on prose prompts: prose {_pct(co['none']['prose'])} -> {_pct(co['profile (bias+mask)']['prose'])}; "
        f"but the random controls also cut prose to {ctl(co, 'prose')}: this small model's prose continuations "
        "break down under almost any routing perturbation and code is the stronger attractor, so part of this "
        "profile's effect is generic disruption. The `prose` direction is the clean demonstration.",
        "- Steered text is not fluent. The `prose` profile turns code prompts into prose-like sentences that often "
        "keep the code's indentation (samples below); the classifier counts markers, not quality.",
        "- Measurement: reference model in fp32, greedy, exactly 32 new tokens with </s> banned (vLLM: "
        "`temperature=0, max_tokens=32, min_tokens=32`), prompts sent without special tokens; profile rows at every "
        "position, prefill and decode, scaled by each token's own logit standard deviation. Prompts: "
        "`PROMPTS_CODE` / `PROMPTS_PROSE` in demo/eval.py (held-out split); alpha was picked "
        f"from {list(ALPHAS)} on the separate calibration prompts (largest target share, ties to the smaller alpha).",
        "",
    ]
    lines += ["Steered samples (`prose` profile on code prompts):", ""]
    for s in r["steered_samples"]:
        lines += ["```", s["prompt"] + "⟨" + s["continuation"] + "⟩", "```"]
    lines.append("")
    (out / "README.md").write_text("\n".join(lines))


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    set_determinism(args.seed, args.threads)
    info = None
    if not args.skip_training:
        info = train(args, out)
    if not args.no_eval:
        set_determinism(args.seed, args.threads)
        t = time.time()
        evaluate(out, info)
        print(f"evaluation took {time.time() - t:.0f}s", flush=True)


if __name__ == "__main__":
    main()
