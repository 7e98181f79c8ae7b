"""How much each pool expert is used: from a running server's /metrics, or from a calibration run.

Both give token-slots per (pool, expert), `[P, E]`: the server counts every token its
engine computed (`unipool_expert_tokens_total{pool,expert}`, docs/server.md); a calibration
run routes the prompts of a JSONL file through the reference model on CPU (one
`{"prompt": "..."}` or `{"messages": [...]}` per line) and counts the same way. A pool's
count sums the layers that share it, so a global pool is ranked by all layers' use and a
per-layer pool by its own layer's. Used by `unipool-steering subpool` and
`unipool-convert prune`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from unipool_serve.model_executor.config import UniPoolConfig

_SAMPLE = re.compile(r'^unipool_expert_tokens_total\{([^}]*)\} (\S+)$', re.MULTILINE)


class UsageError(ValueError):
    """The usage source cannot be read for this model; the message says why and what to do."""


def read_usage(source: str, model_dir: Path, config: UniPoolConfig, max_tokens: int = 256) -> torch.Tensor:
    """[P, E] token-slots per pool expert from `source`: an http(s) URL of a server, or a JSONL file."""
    if re.match(r"^https?://", source):
        usage = usage_from_metrics(source, config)
    else:
        usage = usage_from_calibration(Path(source), model_dir, config, max_tokens)
    if usage.sum() <= 0:
        raise UsageError(f"{source}: no token was routed yet, so there is nothing to rank experts by")
    return usage


def usage_from_metrics(url: str, config: UniPoolConfig) -> torch.Tensor:
    import httpx

    try:
        resp = httpx.get(url.rstrip("/") + "/metrics", timeout=60)
        resp.raise_for_status()
    except httpx.HTTPError as exc:
        raise UsageError(f"{url}/metrics could not be read ({exc})") from None
    usage = torch.zeros(config.num_pools, config.num_experts, dtype=torch.float64)
    found = 0
    for labels, value in _SAMPLE.findall(resp.text):
        pool, expert = (int(re.search(rf'{k}="(\d+)"', labels).group(1)) for k in ("pool", "expert"))
        if pool >= config.num_pools or expert >= config.num_experts:
            raise UsageError(f"{url} serves pool {pool} expert {expert}: not this model's layout "
                             f"({config.num_pools} pools of {config.num_experts} experts)")
        usage[pool, expert] += float(value)
        found += 1
    if not found:
        raise UsageError(f"{url}/metrics has no unipool_expert_tokens_total samples: is it a unipool-serve server?")
    return usage


def usage_from_calibration(path: Path, model_dir: Path, config: UniPoolConfig, max_tokens: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    from unipool_serve.model_executor.reference.hf_registration import register_hf
    from unipool_serve.model_executor.reference.model import UniPoolForCausalLM

    if not path.is_file():
        raise UsageError(f"{path} is neither an http(s) URL nor a file")
    texts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise UsageError(f"{path}:{number}: not JSON ({exc})") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt", item.get("messages")), (str, list)):
            raise UsageError(f"{path}:{number}: expected {{\"prompt\": \"...\"}} or {{\"messages\": [...]}}")
        texts.append(item)
    if not texts:
        raise UsageError(f"{path}: no calibration prompts")
    register_hf()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = UniPoolForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    counts = torch.zeros(config.num_hidden_layers, config.num_experts + 1, dtype=torch.float64)
    with torch.no_grad():
        for item in texts:
            text = item["prompt"] if "prompt" in item else tokenizer.apply_chat_template(
                item["messages"], tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
            logits = model(input_ids=ids, output_router_logits=True)["router_logits"]
            for layer, layer_logits in enumerate(logits):
                router = model.model.layers[layer].moe.router
                chosen, _ = router.route(layer_logits, layer, None)
                counts[layer].index_add_(0, chosen.reshape(-1).long(), torch.ones(chosen.numel(), dtype=torch.float64))
    usage = torch.zeros(config.num_pools, config.num_experts, dtype=torch.float64)
    for layer in range(config.num_hidden_layers):
        usage[config.layer_to_pool(layer)] += counts[layer, :-1]
    return usage
