"""Fixed prompts and measurements for the demo model's behaviours and its steering profiles.

Reusable by every path that serves models/unipool-demo (reference model, vLLM engine,
HTTP server): the prompts are fixed strings (generated deterministically from the
held-out split of the grammar), the decoding is fixed (greedy, exactly 32 new tokens
with </s> banned: vLLM `temperature=0, max_tokens=32, min_tokens=32`), prompts are
sent without special tokens, and `classify` decides the kind.

The reference measurement here runs `UniPoolForCausalLM` with `steering_bias` /
`steering_mask` rows, the exact routing semantics the engine implements
(kernels/routing_reference.py).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from .classifier import classify
from .corpus import CALIBRATION_SEED, HELDOUT_SEED, documents

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "unipool-demo"
MAX_NEW_TOKENS = 32
NUM_PROMPTS = 40


def prompt_of(document: str, kind: str) -> str:
    """The opening of a corpus document used as a prompt, never ending in whitespace.

    code:  everything up to the colon that ends the first `def`/`class` line;
    prose: the first sentence.
    """
    if kind == "code":
        lines = []
        for line in document.split("\n"):
            lines.append(line)
            if line.lstrip().startswith(("def ", "class ")):
                break
        return "\n".join(lines)
    if kind == "prose":
        end = min(i for i in (document.find(". "), document.find(".\n"), len(document) - 1) if i >= 0)
        return document[: end + 1]
    raise ValueError(f"kind must be 'prose' or 'code', got {kind!r}")


def make_prompts(kind: str, count: int = NUM_PROMPTS, seed: int = HELDOUT_SEED) -> list[str]:
    """`count` distinct prompts from documents of a split the model never trained on."""
    prompts: list[str] = []
    for doc in documents(kind, 4 * count, seed):
        p = prompt_of(doc, kind)
        if p not in prompts:
            prompts.append(p)
        if len(prompts) == count:
            return prompts
    raise RuntimeError(f"could not draw {count} distinct {kind} prompts")


# The fixed evaluation sets: held-out split (seed HELDOUT_SEED); never used to fit profiles.
PROMPTS_CODE: list[str] = make_prompts("code")
PROMPTS_PROSE: list[str] = make_prompts("prose")
# Calibration sets (seed CALIBRATION_SEED): used only to pick profile strengths.
CALIBRATION_CODE: list[str] = make_prompts("code", seed=CALIBRATION_SEED)
CALIBRATION_PROSE: list[str] = make_prompts("prose", seed=CALIBRATION_SEED)


def load_demo(path: str | Path = DEMO_MODEL_DIR):
    """(model, tokenizer) of a demo folder through the reference model, fp32, eval mode."""
    from transformers import PreTrainedTokenizerFast

    from unipool_serve.model_executor.reference.model import UniPoolForCausalLM

    model = UniPoolForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    return model, tokenizer


def _rows(t: torch.Tensor | None, batch: int, dtype: torch.dtype) -> torch.Tensor | None:
    if t is None:
        return None
    if t.dim() != 2:
        raise ValueError(f"steering rows must be [L, E], got {tuple(t.shape)}")
    return t.to(dtype).unsqueeze(0).expand(batch, -1, -1).contiguous()  # [B, L, E]


@torch.no_grad()
def greedy_continuations(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    bias_rows: torch.Tensor | None = None,
    mask_rows: torch.Tensor | None = None,
    min_new_tokens: int | None = None,
) -> list[str]:
    """Greedy continuations (text of the new tokens) of each prompt.

    Exactly `max_new_tokens` tokens are generated unless `min_new_tokens` is set lower:
    </s> is banned (its logit set to -inf) until `min_new_tokens` (default: all of
    them) are out, after which a sequence stops at its first </s>. In vLLM terms the
    default is `SamplingParams(temperature=0, max_tokens=32, min_tokens=32)`. Without
    the ban the demo model, greedy, often ends a prose document right after the
    prompt's sentence (</s> is the single likeliest next token there, even though
    most of its probability lies on the many ways to start another sentence).

    bias_rows: [L, E] fp32 with alpha folded in (a profile's `bias_rows()`);
    mask_rows: [L, E] int8 (+1 include, -1 exclude; a profile's `mask_rows()`).
    The same rows apply to every position, prefill and decode. Prompts are encoded
    without special tokens (as an OpenAI completion request sends them) and batched
    only with prompts of the same token length, so no padding enters the computation.
    """
    from transformers.cache_utils import DynamicCache

    eos = tokenizer.eos_token_id
    min_new = max_new_tokens if min_new_tokens is None else min_new_tokens
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    results: list[str] = [""] * len(prompts)
    for _, members in sorted(groups.items()):
        ids = torch.tensor([encoded[i] for i in members], dtype=torch.long)
        batch = ids.shape[0]
        bias, mask = _rows(bias_rows, batch, torch.float32), _rows(mask_rows, batch, torch.int8)
        cache = DynamicCache(config=model.config)
        new = torch.empty(batch, 0, dtype=torch.long)
        step_input = ids
        for step in range(max_new_tokens):
            out = model(input_ids=step_input, past_key_values=cache, use_cache=True,
                        steering_bias=bias, steering_mask=mask, logits_to_keep=1)
            logits = out.logits[:, -1].float()  # [B, V]
            if step < min_new:
                logits[:, eos] = float("-inf")
            nxt = logits.argmax(dim=-1, keepdim=True)  # [B, 1]
            new = torch.cat([new, nxt], dim=1)
            cache = out.past_key_values
            step_input = nxt
            if bool((new == eos).any(dim=1).all()):
                break
        for row, i in enumerate(members):
            toks = new[row].tolist()
            if eos in toks:
                toks = toks[: toks.index(eos)]
            results[i] = tokenizer.decode(toks, skip_special_tokens=True)
    return results


def kind_shares(texts: Sequence[str]) -> dict[str, float]:
    """Share of texts classified as each of 'prose', 'code', 'other'."""
    counts = Counter(classify(t) for t in texts)
    return {label: counts.get(label, 0) / max(len(texts), 1) for label in ("prose", "code", "other")}


def measure(model, tokenizer, prompts: Sequence[str], *, bias_rows=None, mask_rows=None,
            max_new_tokens: int = MAX_NEW_TOKENS) -> dict[str, float]:
    """kind_shares of the greedy continuations (exactly max_new_tokens, </s> banned) of
    `prompts` under the given steering rows."""
    texts = greedy_continuations(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                 bias_rows=bias_rows, mask_rows=mask_rows)
    return kind_shares(texts)


def random_like(bias: torch.Tensor | None, mask: torch.Tensor | None, seed: int):
    """A control profile of the same size: per layer, the same nonzero values (bias) and the
    same numbers of includes/excludes (mask), placed on experts drawn at random."""
    rng = random.Random(seed)
    ref = bias if bias is not None else mask
    layers, experts = ref.shape
    out_b = None if bias is None else torch.zeros_like(bias)
    out_m = None if mask is None else torch.zeros_like(mask)
    for layer in range(layers):
        perm = list(range(experts))
        rng.shuffle(perm)
        perm_t = torch.tensor(perm)
        # one permutation per layer moves bias and mask entries together
        if bias is not None:
            out_b[layer, perm_t] = bias[layer]
        if mask is not None:
            out_m[layer, perm_t] = mask[layer]
    return out_b, out_m


@torch.no_grad()
def routing_rates(model, tokenizer, texts: Sequence[str], *, max_tokens: int = 256,
                  bias_rows=None, mask_rows=None) -> torch.Tensor:
    """[L, E] fraction of tokens of `texts` whose top-k (k = config) picked each expert, per layer."""
    from unipool_serve.kernels.routing_reference import route

    cfg = model.config
    counts = torch.zeros(cfg.num_hidden_layers, cfg.num_experts, dtype=torch.float64)
    total = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        if not ids:
            continue
        x = torch.tensor([ids])
        out = model(input_ids=x, output_router_logits=True,
                    steering_bias=_rows(bias_rows, 1, torch.float32), steering_mask=_rows(mask_rows, 1, torch.int8))
        for layer, logits in enumerate(out["router_logits"]):
            router = model.model.routers[cfg.layer_to_router(layer)]
            b = None if bias_rows is None else bias_rows[layer].float().expand_as(logits)
            m = None if mask_rows is None else mask_rows[layer].to(torch.int8).expand_as(logits)
            top_ids, _ = route(logits, router.spec, router.scale, bias=b, mask=m)
            counts[layer] += torch.bincount(top_ids.reshape(-1).long(), minlength=cfg.num_experts).double()
        total += len(ids) * cfg.num_experts_per_tok
    return (counts / max(total, 1)).float()
