"""The prose/code classifier: documented markers, and accuracy on held-out corpus text."""

from __future__ import annotations

import pytest

from unipool_serve.demo.classifier import classify, code_score, markers
from unipool_serve.demo.corpus import HELDOUT_SEED, documents


def test_obvious_examples():
    assert classify("def add(a, b):\n    return a + b\n") == "code"
    assert classify("for item in boxes:\n    total += len(item)") == "code"
    assert classify("The old baker walked slowly to the river because she was tired.") == "prose"
    assert classify("He opened the letter and smiled.") == "prose"


def test_undecided_text_is_other():
    assert classify("") == "other"
    assert classify("river river river") == "other"
    assert code_score("") == 0.0


def test_markers_count_as_documented():
    m = markers("x = len(y)")
    assert m.code == 1 + 2 + 2  # '=' '(' ')' + keyword len
    assert m.prose == 0
    m = markers("She saw the boat. ")
    assert m.prose == 2 + 2  # she, the + one sentence end
    assert m.code == 0
    assert markers("self.count").code == 2 + 1  # keyword + attribute dot


@pytest.mark.parametrize("kind", ["prose", "code"])
def test_heldout_accuracy(kind):
    docs = documents(kind, 200, HELDOUT_SEED)
    whole = sum(classify(d) == kind for d in docs) / len(docs)
    # windows of ~100 characters (about 32 tokens), the size of a continuation
    windows = [d[i:i + 100] for d in docs for i in range(0, len(d) - 100, 100)]
    part = sum(classify(w) == kind for w in windows) / len(windows)
    assert whole == 1.0
    assert part >= 0.99, part
