"""Real Megatron checkpoints for the converter tests, built with megatron-core on CPU.

`write_checkpoint(folder, **spec)` starts `tp * ep` processes of this file (gloo). Each
builds a GPT MoE model with megatron-core's local layer spec, points the layers' experts
at one module per pool as the UniPool fork's `--moe-expert-pool-mode hyper` does, and
saves its rank file where and as Megatron's `--ckpt-format torch` does
(`iter_XXXXXXX/mp_rank_TT[_EEE]/model_optim_rng.pt`: `args`, `model`,
`checkpoint_version`, `iteration`, `rng_state`; plus `latest_checkpointed_iteration.txt`).
Then every rank runs Megatron's own forward on the spec's token ids and rank 0 saves the
logits to `megatron_logits.pt`: the ground truth a converted model must reproduce.

What is ours, not megatron-core's:
- NormRouter: stock megatron-core has none. `NormRouter` below swaps TopKRouter's routing
  for the UniPool formula (s = sigma * c * relu(z / (||z|| + eps)), top-k of s, gates = s)
  and adds the `norm_scale` parameter the fork saves.
- `args`: megatron-core ships no training argument parser, so the namespace is written
  here with the fork's argument names (megatron/training/arguments.py), including a real
  Megatron enum (`AttnBackend`), `exit_signal` (a `signal.Signals`) and numpy RNG state, as
  the fork's files hold.
- CPU forward: megatron-core 0.16 assumes CUDA in three places of an inference forward;
  `_patch_for_cpu` points them at the CPU. The legacy GroupedMLP needs the CUDA-only
  `grouped_gemm` package: its `gmm` is replaced by a per-expert matmul loop (the weight
  views and transposes stay Megatron's).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ITERATION = 7


def write_gpt2_files(folder: Path) -> dict[str, Path]:
    """A tiny GPT-2-style vocab.json + merges.txt (byte-level BPE, 320 tokens, <|endoftext|>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog.", "def f(x):\n    return x * 2\n"] * 20,
                            trainer=trainer)
    tok.model.save(str(folder))
    return {"vocab_file": folder / "vocab.json", "merge_file": folder / "merges.txt"}


def write_checkpoint(folder: Path, **spec) -> dict:
    """Build and save a checkpoint into `folder`; returns the spec with defaults filled in."""
    spec = {
        "tp": 1, "ep": 1, "layers": 4, "hidden": 64, "heads": 4, "groups": 2, "head_dim": 16,
        "experts": 4, "topk": 1, "ffn": 32, "vocab": 384, "pool": "hyper", "pool_size": 1,
        "router": "norm", "norm_init": "monte_carlo", "layout": "sequential", "untie": True,
        "shared_expert": 0, "seed": 0, "rotary_base": 1e6, "eps": 1e-5, "max_pos": 256,
        "tokens": [[5, 9, 3, 17, 40, 2, 11, 8]], "iteration": ITERATION, "norm_c": None, **spec,
    }
    if spec["router"] == "norm" and spec["norm_c"] is None:
        from unipool_serve.model_executor.config import norm_router_constant

        spec["norm_c"] = 1.0 if spec["norm_init"] == "one" else norm_router_constant(spec["experts"], spec["topk"])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.json").write_text(json.dumps(spec))
    world = spec["tp"] * spec["ep"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, __file__, str(folder)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=1800)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("megatron-core checkpoint writer failed:\n" + "\n".join(o[-4000:] for o in outputs))
    return spec


# ---- below: runs inside the rank processes --------------------------------------


def _patch_for_cpu():
    import contextlib
    import types

    import torch

    import megatron.core.tensor_parallel as tensor_parallel
    import megatron.core.tensor_parallel.random as tp_random
    import megatron.core.transformer.moe.grouped_gemm_util as gg
    import megatron.core.transformer.moe.moe_utils as moe_utils

    torch.cuda.current_device = lambda: "cpu"  # tensors Megatron places "on the GPU" land on the CPU

    class NoRngTracker:  # eval forward: dropout is off, so no CUDA RNG state is needed
        def fork(self, *args, **kwargs):
            return contextlib.nullcontext()

    tensor_parallel.get_cuda_rng_tracker = tp_random.get_cuda_rng_tracker = lambda *a, **k: NoRngTracker()
    moe_utils.te_general_gemm = None  # referenced unguarded when Transformer Engine is absent

    def gmm(a, b, batch_sizes, trans_b=False):  # grouped_gemm.ops.gmm, one matmul per expert
        outs, start = [], 0
        for i, n in enumerate(batch_sizes.tolist()):
            w = b[i].t() if trans_b else b[i]
            outs.append(a[start:start + n] @ w)
            start += n
        return torch.cat(outs)

    gg.grouped_gemm_is_available = lambda: True
    gg.assert_grouped_gemm_is_available = lambda: None
    gg.ops = types.SimpleNamespace(gmm=gmm)


def _norm_router_class():
    import torch

    from megatron.core.transformer.moe.router import TopKRouter

    class NormRouter(TopKRouter):
        """UniPool's NormRouter scoring on megatron-core's router (see the module docstring)."""

        norm_c = 1.0

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.norm_scale = torch.nn.Parameter(torch.ones(1))

        def routing(self, logits, padding_mask=None):
            logits = logits.view(-1, self.config.num_moe_experts)
            scores = torch.relu(logits / (logits.norm(dim=-1, keepdim=True) + 1e-8)) * self.norm_scale * self.norm_c
            _, top = torch.topk(scores, k=self.topk, dim=1)
            routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, top, True)
            return scores * routing_map, routing_map

    return NormRouter


def _scale_experts(experts, ep_rank: int) -> None:
    local = experts.num_local_experts
    for j in range(local):
        factor = 1.0 + 0.25 * (ep_rank * local + j)
        if hasattr(experts, "local_experts"):  # SequentialMLP
            for p in experts.local_experts[j].parameters():
                p.mul_(factor)
        else:  # legacy GroupedMLP: weight1 [H, El*2F/tp] is viewed as [El, H, 2F/tp]
            experts.weight1.view(local, experts.config.hidden_size, -1)[j].mul_(factor)
            experts.weight2.view(local, -1, experts.config.hidden_size)[j].mul_(factor)


def _args(spec: dict):
    import argparse
    import signal

    import torch

    from megatron.core.transformer.enums import AttnBackend

    router = spec["router"]
    return argparse.Namespace(
        num_layers=spec["layers"], hidden_size=spec["hidden"], num_attention_heads=spec["heads"],
        group_query_attention=spec["groups"] != spec["heads"], num_query_groups=spec["groups"],
        kv_channels=spec["head_dim"], ffn_hidden_size=4 * spec["hidden"], moe_ffn_hidden_size=spec["ffn"],
        padded_vocab_size=spec["vocab"], make_vocab_size_divisible_by=32, max_position_embeddings=spec["max_pos"],
        seq_length=spec["max_pos"], position_embedding_type="rope", rotary_base=spec["rotary_base"],
        rotary_percent=1.0, rotary_interleaved=False, use_rope_scaling=False, normalization="RMSNorm",
        norm_epsilon=spec["eps"], swiglu=True, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=False,
        apply_layernorm_1p=False, untie_embeddings_and_output_weights=spec["untie"],
        num_experts=spec["experts"] * (spec["pool_size"] if spec["pool"] == "shared" else 1),
        moe_router_topk=spec["topk"], moe_expert_pool_mode=spec["pool"], moe_expert_pool_size=spec["pool_size"],
        moe_norm_routing=router == "norm", moe_norm_routing_eps=1e-8, moe_norm_routing_init_method=spec["norm_init"],
        moe_router_score_function="sigmoid" if router == "sigmoid" else "softmax",
        moe_router_pre_softmax=router == "softmax_pre", moe_router_enable_expert_bias=False,
        moe_router_topk_scaling_factor=None, moe_router_num_groups=None, moe_router_group_topk=None,
        moe_router_load_balancing_type="aux_loss", moe_layer_freq=1, moe_shared_expert_intermediate_size=(
            spec["shared_expert"] or None), moe_shared_expert_gate=False, moe_grouped_gemm=spec["layout"] != "sequential",
        moe_use_legacy_grouped_gemm=spec["layout"] == "legacy_grouped", moe_token_dispatcher_type="allgather",
        tensor_model_parallel_size=spec["tp"], pipeline_model_parallel_size=1, expert_model_parallel_size=spec["ep"],
        expert_tensor_parallel_size=spec["tp"], sequence_parallel=spec["tp"] > 1, bf16=False, fp16=False,
        params_dtype=torch.float32, tokenizer_type="GPT2BPETokenizer", vocab_file=None, merge_file=None,
        attention_backend=AttnBackend.auto, exit_signal=signal.SIGTERM, transformer_impl="local", ckpt_format="torch",
        iteration=spec["iteration"],
    )


def _rank_main(folder: Path) -> None:
    import random
    import types

    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    spec = json.loads((folder / "spec.json").read_text())
    _patch_for_cpu()
    dist.init_process_group("gloo")
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    ps.initialize_model_parallel(tensor_model_parallel_size=spec["tp"], expert_model_parallel_size=spec["ep"])
    torch.manual_seed(spec["seed"])
    router = spec["router"]
    config = TransformerConfig(
        num_layers=spec["layers"], hidden_size=spec["hidden"], num_attention_heads=spec["heads"],
        num_query_groups=spec["groups"], kv_channels=spec["head_dim"], ffn_hidden_size=4 * spec["hidden"],
        gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm", add_bias_linear=False,
        layernorm_epsilon=spec["eps"], num_moe_experts=spec["experts"] * (spec["pool_size"] if spec["pool"] == "shared" else 1),
        moe_router_topk=spec["topk"], moe_ffn_hidden_size=spec["ffn"],
        moe_router_pre_softmax=router in ("softmax_pre", "norm"),
        moe_router_score_function="sigmoid" if router == "sigmoid" else "softmax",
        moe_router_load_balancing_type="none", moe_token_dispatcher_type="allgather",
        moe_shared_expert_intermediate_size=spec["shared_expert"] or None,
        moe_grouped_gemm=spec["layout"] != "sequential", tensor_model_parallel_size=spec["tp"],
        expert_model_parallel_size=spec["ep"], sequence_parallel=False, use_cpu_initialization=True,
        params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.05,
    )
    layer_spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, normalization="RMSNorm",
                                          moe_grouped_gemm=spec["layout"] != "sequential",
                                          moe_use_legacy_grouped_gemm=spec["layout"] == "legacy_grouped")
    model = GPTModel(config, layer_spec, vocab_size=spec["vocab"], max_sequence_length=spec["max_pos"],
                     position_embedding_type="rope", rotary_base=spec["rotary_base"],
                     share_embeddings_and_output_weights=not spec["untie"], parallel_output=False)
    layers = model.decoder.layers
    gen = torch.Generator().manual_seed(spec["seed"] + 1)  # the same on every rank
    if router == "norm":
        NormRouter = _norm_router_class()
        NormRouter.norm_c = spec["norm_c"]
        for layer in layers:
            old = layer.mlp.router
            groups = types.SimpleNamespace(tp=old.tp_group, cp=old.cp_group, tp_cp=old.tp_cp_group,
                                           tp_dp_cp=old.tp_dp_cp_group)
            new = NormRouter(config=old.config, pg_collection=groups)
            new.weight.data.copy_(old.weight.data)
            new.norm_scale.data.uniform_(0.5, 1.5, generator=gen)
            new.set_layer_number(layer.layer_number)
            layer.mlp.router = new
    # UniPool's pools: every layer of a group points at its leader's experts module.
    per_pool = {"hyper": spec["pool_size"] if spec["pool_size"] > 1 else spec["layers"],
                "shared": spec["pool_size"], "none": 1}[spec["pool"]]
    for i, layer in enumerate(layers):
        layer.mlp.experts = layers[i - i % per_pool].mlp.experts
    ep_rank = ps.get_expert_model_parallel_rank()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:  # RMSNorm weights start at 1: make them matter
                p.uniform_(0.7, 1.3, generator=gen)
        # Every EP rank drew its local experts from the same stream: scale each expert by a
        # factor of its global index (the same factor on every TP slice) so they differ.
        for i, layer in enumerate(layers):
            if i % per_pool == 0:
                _scale_experts(layer.mlp.experts, ep_rank)

    tp_rank = ps.get_tensor_model_parallel_rank()
    name = f"mp_rank_{tp_rank:02d}" + (f"_{ep_rank:03d}" if spec["ep"] > 1 else "")
    path = folder / f"iter_{spec['iteration']:07d}" / name / "model_optim_rng.pt"
    if ps.get_expert_data_parallel_rank() == 0:  # as Megatron: one writer per (tp, ep) shard
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                "torch_rng_state": torch.get_rng_state()}]
        torch.save({"args": _args(spec), "checkpoint_version": 3.0, "iteration": spec["iteration"],
                    "model": model.state_dict(), "rng_state": rng}, path)
    dist.barrier()
    if dist.get_rank() == 0:
        (folder / "latest_checkpointed_iteration.txt").write_text(str(spec["iteration"]))

    model.eval()
    if spec["layout"] == "legacy_grouped":
        config.bf16 = True  # GroupedMLP.forward asserts bf16 training; the weights here are fp32
    logits = []
    with torch.no_grad():
        for ids in spec["tokens"]:
            n = len(ids)
            mask = torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), diagonal=1)  # True = masked
            out = model(torch.tensor([ids]), torch.arange(n)[None], mask)  # [1, S, V]
            logits.append(out[0].float())
    if dist.get_rank() == 0:
        torch.save(logits, folder / "megatron_logits.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]))
