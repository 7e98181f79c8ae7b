"""Check `unipool-convert megatron` against a checkpoint written by the UniPool fork's own code.

    python scripts/verify_fork_checkpoint.py --fork ~/src/UniPool --out /tmp/forkcheck [--tp 2]
        [--extra "--moe-grouped-gemm --bf16"]

Needs a checkout of github.com/Centaurus-Alpha/UniPool (its megatron/ goes first on the
path, so its NormRouter, hyper-mode TransformerBlock, argument parser and
generate_state_dict are the ones that run) and the `six` package it imports. On the CPU,
with gloo: each of --tp ranks parses a small UniPool-shaped command line (the 182M script's
flags, shrunk) with the fork's parse_args/validate_args, builds the GPT model from its
TransformerConfig with the local layer spec, draws the NormRouter scales, saves its rank
file with the fork's generate_state_dict and get_checkpoint_name, and runs the fork's
forward on fixed tokens. Then the checkpoint is converted in a process where importing
Megatron fails, and the reference model's logits are compared with the fork's.

CPU stand-ins (the fork assumes CUDA): torch.cuda.current_device -> "cpu", the device
capability queries of validate_args, the CUDA RNG tracker (dropout is off), and
grouped_gemm's gmm (a per-expert matmul loop) for --moe-grouped-gemm. Not run by the test
suite (the fork is not a package); docs/megatron.md records its results.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

TOKENS = [[5, 9, 3, 17, 40, 2, 11, 8, 100, 250, 7, 64]]
ITERATION = 10


def _flags(save: Path, tp: int, vocab: Path, merges: Path) -> list[str]:
    return f"""--use-mcore-models --disable-bias-linear --seq-length 64 --max-position-embeddings 64
    --num-layers 4 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 --init-method-std 0.05
    --attention-dropout 0.0 --hidden-dropout 0.0 --normalization RMSNorm --position-embedding-type rope --swiglu
    --untie-embeddings-and-output-weights --group-query-attention --num-query-groups 2 --no-masked-softmax-fusion
    --no-position-embedding --rotary-base 1000000 --num-experts 32 --moe-router-topk 1
    --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 0 --moe-token-dispatcher-type allgather
    --moe-expert-pool-mode hyper --moe-norm-routing --moe-pool-aux-loss-coeff 1e-2
    --tensor-model-parallel-size {tp} --pipeline-model-parallel-size 1 --expert-model-parallel-size 1
    --micro-batch-size 1 --global-batch-size 1 --train-iters {ITERATION} --lr 1e-4
    --ckpt-format torch --save {save} --save-interval {ITERATION} --tokenizer-type GPT2BPETokenizer
    --vocab-file {vocab} --merge-file {merges} --make-vocab-size-divisible-by 64 --transformer-impl local
    --no-gradient-accumulation-fusion --use-cpu-initialization --no-rope-fusion --no-bias-swiglu-fusion
    --no-persist-layer-norm""".split()


def _rank(save: Path, flags: list[str]) -> None:
    """One rank, inside the fork's megatron."""
    import contextlib
    import types

    import torch
    import torch.distributed as dist

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.get_device_capability = lambda *a: (9, 0)
    sys.argv = ["pretrain_gpt.py", *flags]
    dist.init_process_group("gloo")
    import megatron.core.tensor_parallel as tensor_parallel
    import megatron.core.tensor_parallel.random as tp_random
    import megatron.core.transformer.moe.grouped_gemm_util as gg
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.training.arguments as arguments
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.training.checkpointing import generate_state_dict, get_checkpoint_name, get_checkpoint_tracker_filename
    from megatron.training.tokenizer import build_tokenizer

    class NoRng:
        def fork(self, *a, **k):
            return contextlib.nullcontext()

    def gmm(a, b, batch_sizes, trans_b=False):
        outs, start = [], 0
        for i, n in enumerate(batch_sizes.tolist()):
            outs.append(a[start:start + n] @ (b[i].t() if trans_b else b[i]))
            start += n
        return torch.cat(outs)

    tensor_parallel.get_cuda_rng_tracker = tp_random.get_cuda_rng_tracker = lambda *a, **k: NoRng()
    moe_utils.te_general_gemm = getattr(moe_utils, "te_general_gemm", None)
    gg.grouped_gemm_is_available, gg.assert_grouped_gemm_is_available = (lambda: True), (lambda: None)
    gg.ops = types.SimpleNamespace(gmm=gmm)
    arguments.get_device_arch_version = lambda: 9

    args = arguments.parse_args()
    arguments.validate_args(args, {})
    build_tokenizer(args)  # sets args.padded_vocab_size as training does
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tensor_model_parallel_size)
    torch.manual_seed(1)
    config = arguments.core_transformer_config_from_args(args)
    spec = get_gpt_layer_local_spec(num_experts=args.num_experts, moe_grouped_gemm=args.moe_grouped_gemm,
                                    moe_use_legacy_grouped_gemm=args.moe_use_legacy_grouped_gemm,
                                    normalization="RMSNorm")
    model = GPTModel(config, spec, vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
                     position_embedding_type="rope", rotary_base=args.rotary_base,
                     share_embeddings_and_output_weights=False, parallel_output=False)
    layers = model.decoder.layers
    assert all(layer.mlp.experts is layers[0].mlp.experts for layer in layers), "hyper mode did not share the pool"
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in layers:
            layer.mlp.router.norm_scale.uniform_(0.5, 1.5, generator=gen)
    path = Path(get_checkpoint_name(str(save), ITERATION))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(generate_state_dict(args, [model], None, None, None, iteration=ITERATION), path)
    dist.barrier()
    model.eval()
    n = len(TOKENS[0])
    with torch.no_grad():
        logits = model(torch.tensor(TOKENS), torch.arange(n)[None], torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), 1))
    if dist.get_rank() == 0:
        Path(get_checkpoint_tracker_filename(str(save))).write_text(str(ITERATION))
        torch.save({"logits": logits[0].float(), "c": layers[0].mlp.router.scale_initial}, save / "fork_logits.pt")
    dist.barrier()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fork", type=Path, required=True, help="checkout of Centaurus-Alpha/UniPool")
    parser.add_argument("--out", type=Path, required=True, help="empty work folder")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--extra", default="", help="more fork flags, e.g. '--moe-grouped-gemm --bf16'")
    parser.add_argument("--rank-of", type=Path, help=argparse.SUPPRESS)  # internal: run one rank
    args = parser.parse_args()
    save, converted, tok = args.out / "checkpoint", args.out / "converted", args.out / "gpt2"
    if args.rank_of:
        _rank(args.rank_of, _flags(args.rank_of, args.tp, tok / "vocab.json", tok / "merges.txt") + args.extra.split())
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from megatron_checkpoints import write_gpt2_files

    write_gpt2_files(tok)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, __file__, "--fork", str(args.fork), "--out", str(args.out),
                               "--tp", str(args.tp), "--extra", args.extra, "--rank-of", str(save)],
                              env={**os.environ, "PYTHONPATH": os.pathsep.join([str(args.fork.resolve()), os.environ.get("PYTHONPATH", "")]), "RANK": str(r),
                                   "WORLD_SIZE": str(args.tp), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                   "CUDA_DEVICE_MAX_CONNECTIONS": "1", "OMP_NUM_THREADS": "1"})
             for r in range(args.tp)]
    if any(p.wait() for p in procs):
        return 1
    block = "import sys; sys.modules['megatron'] = None; from unipool_serve.tools.convert.cli import main; "
    done = subprocess.run([sys.executable, "-c", block + f"sys.exit(main(['megatron', {str(save)!r}, "
                           f"{str(converted)!r}, '--no-progress']))"])
    if done.returncode:
        return done.returncode
    import torch
    from transformers import AutoModelForCausalLM

    from unipool_serve.model_executor.reference.hf_registration import register_hf

    register_hf()
    fork = torch.load(save / "fork_logits.pt")
    model = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model(torch.tensor(TOKENS)).logits[0]
    print(f"max |logit difference| {(ours - fork['logits']).abs().max().item():.3g} "
          f"(largest logit {fork['logits'].abs().max().item():.3g}); NormRouter c: fork {fork['c']!r}, "
          f"converted {model.config.norm_router_c!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
