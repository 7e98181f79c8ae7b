"""The demo model continues each kind in kind (reference model, greedy, fixed prompts).

Measured when the folder was written (metadata.json "behaviour"): 40/40 code prompts
continue as code and 40/40 prose prompts as prose. The thresholds below leave room
for numerical drift across machines (9 of 10 in kind).
"""

from __future__ import annotations

import json

from unipool_serve.demo.classifier import classify
from unipool_serve.demo.eval import PROMPTS_CODE, PROMPTS_PROSE, greedy_continuations

N = 10


def test_code_prompts_continue_as_code(demo):
    model, tokenizer = demo
    texts = greedy_continuations(model, tokenizer, PROMPTS_CODE[:N])
    labels = [classify(t) for t in texts]
    assert labels.count("code") >= N - 1, list(zip(PROMPTS_CODE[:N], texts, labels))


def test_prose_prompts_continue_as_prose(demo):
    model, tokenizer = demo
    texts = greedy_continuations(model, tokenizer, PROMPTS_PROSE[:N])
    labels = [classify(t) for t in texts]
    assert labels.count("prose") >= N - 1, list(zip(PROMPTS_PROSE[:N], texts, labels))


def test_continuations_have_the_fixed_length(demo):
    model, tokenizer = demo
    texts = greedy_continuations(model, tokenizer, PROMPTS_PROSE[:2], max_new_tokens=8)
    for text in texts:
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= 6  # </s> is banned; re-encoding may merge


def test_recorded_behaviour(demo_dir):
    behaviour = json.loads((demo_dir / "metadata.json").read_text())["behaviour"]
    assert behaviour["code_prompts"]["code"] >= 0.95
    assert behaviour["prose_prompts"]["prose"] >= 0.95
