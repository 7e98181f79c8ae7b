"""A real megatron-core checkpoint shaped like a UniPool run (one global pool shared by every
layer, NormRouter top-1, TP=2, untied embeddings), converted by `unipool-convert megatron`
and served by vLLM: the engine equals the reference model, which equals Megatron's forward."""

import pytest
import torch

from engine_checks import compare_with_reference, generate, prompts, reference_model, start_engine, stop_engine
from megatron_checkpoints import write_checkpoint, write_gpt2_files

pytestmark = pytest.mark.engine

SPEC = dict(tp=2, layers=4, hidden=128, heads=2, groups=1, head_dim=64, experts=8, ffn=64, vocab=384,
            pool="hyper", router="norm", seed=5)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from unipool_serve.tools.convert import cli

    ckpt = tmp_path_factory.mktemp("megatron")
    spec = write_checkpoint(ckpt, **SPEC)
    files = write_gpt2_files(tmp_path_factory.mktemp("gpt2"))
    out = tmp_path_factory.mktemp("served") / "model"
    assert cli.main(["megatron", str(ckpt), str(out), "--vocab-file", str(files["vocab_file"]),
                     "--merge-file", str(files["merge_file"]), "--no-progress"]) == 0
    return out, ckpt, spec


@pytest.fixture(scope="module")
def llm(converted):
    engine = start_engine(converted[0])
    yield engine
    stop_engine(engine)


def test_converted_megatron_checkpoint_serves_like_the_reference(llm, converted):
    out, ckpt, spec = converted
    ref = reference_model(out)
    with torch.no_grad():  # the reference is the converted Megatron model ...
        for ids, want in zip(spec["tokens"], torch.load(ckpt / "megatron_logits.pt")):
            assert (ref(torch.tensor([ids])).logits[0] - want).abs().max().item() <= 1e-5
    ids = prompts(vocab=320)  # ... and the engine serves the reference
    print(compare_with_reference(generate(llm, ids), ids, ref))
