"""The shipped steering profiles switch the demo model's behaviour (reference model).

Measured when the folder was written (metadata.json "steering", README tables), on the
40 fixed prompts, greedy, 32 tokens:
  prose profile on code prompts: code 100% -> 35%; 3 random controls of the same size: 100%.
  code profile on prose prompts: prose 100% -> 0%; random controls: 10%, 80%, 0% prose.
To keep the suite fast the tests use the first 20 prompts of each set (measured there:
code 100% -> 30% with the prose profile, 100% under each of the 3 random controls;
prose 100% -> 0% with the code profile). The thresholds below are well inside those numbers. The code direction gets no
random-control assertion: perturbing the routing at random already pushes many prose
continuations toward code (see models/unipool-demo/README.md).
"""

from __future__ import annotations

import json

import pytest

from unipool_serve.demo.eval import PROMPTS_CODE, PROMPTS_PROSE, measure, random_like

N = 20


@pytest.fixture(scope="module")
def code_prompt_shares(demo, demo_profiles):
    model, tokenizer = demo
    prose = demo_profiles["prose"]
    rb, rm = random_like(prose.bias, prose.mask_rows(), seed=0)
    return {
        "none": measure(model, tokenizer, PROMPTS_CODE[:N]),
        "prose": measure(model, tokenizer, PROMPTS_CODE[:N], bias_rows=prose.bias_rows(), mask_rows=prose.mask_rows()),
        "random": measure(model, tokenizer, PROMPTS_CODE[:N], bias_rows=prose.alpha * rb, mask_rows=rm),
    }


def test_prose_profile_steers_code_prompts_to_prose(code_prompt_shares):
    s = code_prompt_shares
    assert s["none"]["code"] >= 0.9, s
    assert s["prose"]["code"] <= 0.6, s
    assert s["prose"]["prose"] >= 0.4, s
    assert s["none"]["code"] - s["prose"]["code"] >= 0.3, s


def test_random_profile_of_same_size_does_not(code_prompt_shares):
    s = code_prompt_shares
    assert s["random"]["code"] >= 0.85, s
    assert s["random"]["code"] - s["prose"]["code"] >= 0.25, s


def test_code_profile_steers_prose_prompts_to_code(demo, demo_profiles):
    model, tokenizer = demo
    code = demo_profiles["code"]
    steered = measure(model, tokenizer, PROMPTS_PROSE[:N], bias_rows=code.bias_rows(), mask_rows=code.mask_rows())
    assert steered["prose"] <= 0.2, steered
    assert steered["code"] >= 0.7, steered


def test_recorded_steering_table(demo_dir):
    table = json.loads((demo_dir / "metadata.json").read_text())["steering"]
    rows = table["prose"]["rows"]
    assert rows["profile (bias+mask)"]["code"] <= rows["none"]["code"] - 0.3
    assert rows["random control (mean of 3)"]["code"] >= rows["profile (bias+mask)"]["code"] + 0.3
