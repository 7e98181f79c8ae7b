"""Helpers of the engine tests: start/stop engines, and compare them with the reference model."""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from pathlib import Path

import torch

# fp32 on both sides: prompt and sampled logprobs must agree within LOGPROB_TOL
# (absolute, natural-log units); greedy tokens must agree wherever the reference's
# top-1/top-2 margin exceeds it. Measured differences are ~1e-6.
LOGPROB_TOL = 1e-4
# The checks are not vacuous: at most this fraction of generated positions may be
# too close to call (the tiny models' seeds are chosen for clear margins).
MAX_UNCLEAR_FRACTION = 0.1
GEN_TOKENS = 32
PROMPT_LENGTHS = (3, 11, 29, 57)

ENGINE_KWARGS = dict(
    dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8, max_num_batched_tokens=256,
    enable_prefix_caching=False, seed=0,
)


def prompts(seed: int = 1, lengths=PROMPT_LENGTHS, vocab: int = 300) -> list[list[int]]:
    """Token-id prompts of several lengths (ids >= 3 skip pad/bos/eos)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def start_engine(path: Path, *, in_process: bool = True, **overrides):
    """An `LLM` on `path` (ENGINE_KWARGS, then `overrides`).

    in_process (the default): vLLM's engine core runs in this process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0), and so does the worker at tensor and pipeline parallel 1
    (vLLM's CPU platform then keeps its in-process executor); at TP/PP 2 the workers are still
    spawned processes. This saves one or two spawned processes, each of which imports torch and
    vLLM again. Nothing these tests check depends on where the engine core runs; the process
    architecture itself is the server tests' (tests/server, tests/reliability). `worker_cls`
    applies in-process too: the worker class actually running is checked here. The process-wide
    state an in-process engine changes (torch's thread count and its set_num_threads, vLLM's
    environment cache, the frozen GC heap, torch.distributed, torch.compile's caches, the global
    RNGs, environment variables vLLM sets) is put back by stop_engine.
    """
    from vllm import LLM

    kwargs = {**ENGINE_KWARGS, **overrides}
    if not in_process:
        return LLM(model=str(path), **kwargs)
    import vllm.envs

    gc.collect()  # an engine stopped earlier in this process is released before the next one starts
    vllm.envs.disable_envs_cache()  # read this engine's environment, not the previous engine's
    restore = _process_state()
    before = dict(os.environ)
    try:
        with env(VLLM_ENABLE_V1_MULTIPROCESSING=0):
            llm = LLM(model=str(path), **kwargs)
    except BaseException:
        _restore_env(before, dict(os.environ))
        restore()
        raise
    changed_env = dict(os.environ)
    _TORCH_SET_NUM_THREADS(1)  # as vLLM runs its engine processes ("Reducing Torch threads ... for serving")

    def restore_all():
        _restore_env(before, changed_env)
        restore()

    llm.unipool_restore_process = restore_all
    return _check_worker(llm, kwargs.get("worker_cls"))


def stop_engine(llm) -> None:
    restore = getattr(llm, "unipool_restore_process", None)
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    if restore is not None:
        restore()


def _worker_class(wrapper) -> str:
    worker = getattr(wrapper, "worker", wrapper)  # vLLM's WorkerWrapperBase holds the worker
    return f"{type(worker).__module__}.{type(worker).__qualname__}"


def _check_worker(llm, worker_cls: str | None):
    """The worker class every rank runs in-process is the one asked for (vLLM's CPU platform picks
    the executor differently in-process: this shows `worker_cls` still applies)."""
    if worker_cls is not None:
        assert set(llm.collective_rpc(_worker_class)) == {worker_cls}, llm.collective_rpc(_worker_class)
    return llm


_TORCH_SET_NUM_THREADS = torch.set_num_threads  # vLLM's CPU worker replaces it with a no-op in its process


def _process_state():
    """Snapshot what an in-process engine changes in this process; returns the function that puts it back."""
    import random

    import numpy as np

    threads = torch.get_num_threads()
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state())

    def restore():
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        # vLLM's own test cleanup: its environment cache off, the GC heap unfrozen, the model-parallel
        # groups and torch.distributed destroyed, a collection
        cleanup_dist_env_and_memory()
        torch._dynamo.reset()  # a compiled engine's graphs and guards go with it
        torch.set_num_threads = _TORCH_SET_NUM_THREADS
        torch.set_num_threads(threads)
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])
        np.random.set_state(rng[2])

    return restore


def _restore_env(before: dict[str, str], after: dict[str, str]) -> None:
    """Undo the environment variables changed between `before` and `after` (vLLM's own settings)."""
    for key in set(before) | set(after):
        if before.get(key) != after.get(key):
            if key in before:
                os.environ[key] = before[key]
            else:
                os.environ.pop(key, None)


@contextlib.contextmanager
def env(**values):
    """Temporarily set environment variables (read by an engine started inside: an in-process one
    reads them here, spawned workers inherit them)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def reference_model(path: Path):
    from transformers import AutoModelForCausalLM

    from unipool_serve.model_executor.reference.hf_registration import register_hf

    register_hf()
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def reference_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """[S, V] next-token log-probabilities of the reference model over a whole sequence."""
    logits = model(torch.tensor([token_ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1)


@dataclass
class Comparison:
    max_prompt_diff: float
    max_sample_diff: float
    checked_tokens: int
    unclear_tokens: int


def generate(llm, prompt_ids: list[list[int]], max_tokens: int = GEN_TOKENS, prompt_logprobs: int | None = 1):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=1,
                            prompt_logprobs=prompt_logprobs)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
    return outs


def compare_with_reference(outs, prompt_ids: list[list[int]], ref) -> Comparison:
    """Assert the engine's outputs equal the reference model's (see LOGPROB_TOL)."""
    worst_prompt = worst_sample = 0.0
    checked = unclear = 0
    for out, prompt in zip(outs, prompt_ids):
        generated = list(out.outputs[0].token_ids)
        assert len(generated) == GEN_TOKENS, f"expected {GEN_TOKENS} tokens, got {len(generated)}"
        seq = prompt + generated
        ref_lp = reference_logprobs(ref, seq)  # [S, V]
        # prompt logprobs: position i scores prompt[i] given prompt[:i]
        for i in range(1, len(prompt)):
            got = out.prompt_logprobs[i][prompt[i]].logprob
            diff = abs(got - ref_lp[i - 1, prompt[i]].item())
            worst_prompt = max(worst_prompt, diff)
            assert diff <= LOGPROB_TOL, f"prompt logprob at {i} differs by {diff:.2e} (len {len(prompt)})"
        # generated tokens, teacher-forced on the engine's own sequence
        for j, token in enumerate(generated):
            row = ref_lp[len(prompt) - 1 + j]
            top2 = row.topk(2)
            margin = (top2.values[0] - top2.values[1]).item()
            diff = abs(out.outputs[0].logprobs[j][token].logprob - row[token].item())
            worst_sample = max(worst_sample, diff)
            if margin <= LOGPROB_TOL:
                unclear += 1
                continue
            checked += 1
            assert token == int(top2.indices[0]), (
                f"greedy token {j} of prompt len {len(prompt)}: engine {token}, reference {int(top2.indices[0])} "
                f"(margin {margin:.3g})"
            )
            assert diff <= LOGPROB_TOL, f"sampled logprob {j} differs by {diff:.2e}"
    total = checked + unclear
    assert unclear <= MAX_UNCLEAR_FRACTION * total, f"{unclear}/{total} positions too close to call"
    return Comparison(worst_prompt, worst_sample, checked, unclear)


def pool_report(llm) -> list[dict]:
    from unipool_serve.model_executor.introspection import pool_report as report

    return llm.apply_model(report)


def closed_form_param_bytes(config, dtype_bytes: int, padded_width: int, tp: int = 1) -> dict[str, int]:
    """Bytes of the model parameters on one TP rank, counted from the config alone, by kind.

    `linears` (q/k/v/o and shared-expert projections) is separate because vLLM's CPU
    linear method moves those weights into oneDNN handles and leaves empty parameters.
    """
    V, H, L, hd = config.vocab_size, config.hidden_size, config.num_hidden_layers, config.head_dim
    q = config.num_attention_heads * hd // tp
    kv = max(1, config.num_key_value_heads // tp) * hd
    S = config.shared_expert_intermediate_size // tp
    E = config.num_experts
    vocab_rows = -(-V // 64) * 64 // tp  # vLLM pads the vocabulary to 64 rows
    other = vocab_rows * H * (1 if config.tie_word_embeddings else 2) + H + L * 2 * H
    routers_fp32 = config.num_routers * (E * H + (1 if config.router_type == "norm" else 0))
    return {
        "pools": config.num_pools * E * 3 * padded_width * H * dtype_bytes,
        "linears": L * ((q + 2 * kv) * H + H * q + 3 * S * H) * dtype_bytes,
        "other": other * dtype_bytes + routers_fp32 * 4,
    }


def check_param_bytes(report: dict, config, dtype_bytes: int, padded_width: int, tp: int = 1) -> None:
    """Unique parameter bytes in the worker == the closed form (pool counted once, with padding)."""
    expected = closed_form_param_bytes(config, dtype_bytes, padded_width, tp)
    sizes = report["param_sizes"]
    pool_bytes = sum(b for n, (_, b, _, _) in sizes.items() if n.startswith("model.pools."))
    assert pool_bytes == expected["pools"]
    linear_names = [n for n in sizes if n.endswith("_proj.weight") and not n.startswith("model.pools.")]
    linear_bytes = sum(sizes[n][1] for n in linear_names)
    # either all linear weights are ordinary parameters, or the CPU linear method holds them all
    assert linear_bytes in (expected["linears"], 0), (linear_bytes, expected["linears"])
    assert report["param_bytes"] == expected["pools"] + expected["other"] + linear_bytes
