"""benchmarks/shapes.py's Mixtral twin is the vanilla layout's model, tensor for tensor: transformers'
own Mixtral, loaded from the twin, computes the logits our reference model computes from the vanilla
folder. The engine benchmarks compare the two servers on it, so they must be the same model."""

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import shapes  # noqa: E402


def test_the_twin_computes_what_the_vanilla_model_computes(tmp_path):
    from transformers import MixtralForCausalLM

    from unipool_serve.model_executor.reference.model import UniPoolForCausalLM

    shape = shapes.SHAPE_SETS["smoke"]
    fields = shapes.config_fields(shape.layers, shape.hidden, shape.width, shape.experts, shape.top_k)
    vanilla = shapes.write_unipool(tmp_path / "vanilla", fields, layers_per_pool=1)
    twin = shapes.write_mixtral(tmp_path / "mixtral", vanilla)

    ids = torch.randint(3, fields["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = UniPoolForCausalLM.from_pretrained(str(vanilla)).eval()(ids).logits
        theirs_model = MixtralForCausalLM.from_pretrained(str(twin)).eval()
        theirs = theirs_model(ids).logits
    assert sum(p.numel() for p in theirs_model.parameters()) == sum(
        p.numel() for p in UniPoolForCausalLM.from_pretrained(str(vanilla)).parameters())
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_only_the_vanilla_layout_has_a_twin(tmp_path):
    fields = shapes.config_fields(2, 64, 64, 8, 2)
    pooled = shapes.write_unipool(tmp_path / "global", fields, layers_per_pool=2)
    with pytest.raises(ValueError, match="vanilla layout"):
        shapes.write_mixtral(tmp_path / "mixtral", pooled)
