"""The pure-PyTorch reference model: HF `generate` throughput, and u_l (distinct experts per layer per step).

The server only exports cumulative per-expert counts (`unipool_expert_tokens_total`),
not which experts one engine step touched, so u_l is measured here, offline, on the
same prompts the serving runs use: B sequences decode together (B = the concurrency),
and at every decode step each layer's routing over those B tokens is collected.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from unipool_serve.model_executor.reference.model import UniPoolForCausalLM


def load(model_dir: Path, dtype: torch.dtype) -> UniPoolForCausalLM:
    model = UniPoolForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    return model.eval()


def _batch(prompts: list[list[int]], batch: int) -> torch.Tensor:
    rows = [prompts[i % len(prompts)] for i in range(batch)]
    length = min(len(r) for r in rows)  # equal lengths: no padding, no attention mask needed
    return torch.tensor([r[:length] for r in rows])


@torch.inference_mode()
def generate_throughput(model: UniPoolForCausalLM, prompts: list[list[int]], batch: int, output_len: int,
                        repeats: int = 1) -> dict:
    """Output tokens/s of `generate` (greedy, exactly output_len new tokens) for one batch size."""
    ids = _batch(prompts, batch)
    kwargs = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                  pad_token_id=model.config.pad_token_id, eos_token_id=None)
    model.generate(ids[:, :8], **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = model.generate(ids, **kwargs)
        elapsed = time.perf_counter() - t0
        rates.append((out.shape[1] - ids.shape[1]) * batch / elapsed)
    return {"batch": batch, "output_throughput": rates, "threads": torch.get_num_threads()}


def _layer_ids(model: UniPoolForCausalLM, router_logits) -> list[torch.Tensor]:
    cfg = model.config
    out = []
    for layer, logits in zip(model.model.layers, router_logits):
        router = layer.moe.router
        ids, _ = router.route(logits, layer.moe.layer_idx, None)
        out.append(ids)  # [T, k]
    return out


@torch.inference_mode()
def distinct_experts_per_step(model: UniPoolForCausalLM, prompts: list[list[int]], batch: int,
                              output_len: int) -> dict:
    """u_l: distinct pool experts touched by layer l in a decode step of `batch` sequences (greedy)."""
    cfg = model.config
    ids = _batch(prompts, batch)
    out = model(input_ids=ids, use_cache=True, output_router_logits=True)
    cache, per_step = out.past_key_values, []
    prefill = [int(torch.unique(x).numel()) for x in _layer_ids(model, out.router_logits)]
    token = out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
    for _ in range(output_len - 1):
        out = model(input_ids=token, past_key_values=cache, use_cache=True, output_router_logits=True)
        per_step.append([int(torch.unique(x).numel()) for x in _layer_ids(model, out.router_logits)])
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    steps = torch.tensor(per_step, dtype=torch.float64)  # [steps, L]
    m, k = cfg.num_experts, cfg.num_experts_per_tok
    return {
        "batch": batch, "pool_size": m, "top_k": k, "layers": cfg.num_hidden_layers,
        "pools": cfg.num_pools,
        "u_mean_per_layer": steps.mean(0).tolist(),
        "u_mean": float(steps.mean()),
        "u_min": float(steps.min()), "u_max": float(steps.max()),
        "u_uniform": m * (1 - (1 - k / m) ** batch),  # expectation under uniform routing
        "experts_read_per_step": float(steps.sum(1).mean()),  # sum over layers, mean over steps
        "prefill_u_per_layer": prefill, "prefill_tokens": int(ids.numel()),
        "decode_steps": len(per_step),
    }
