"""Judges: decide from a generated text whether it shows the behaviour (True) or not.

--judge takes one of:

    regex:PATTERN                 the behaviour shows when PATTERN matches (re.search)
    keywords:WORD[,WORD...]       when any word occurs, case-insensitively
    callable:MODULE:FUNCTION      when FUNCTION(text) is truthy
    callable:MODULE:FUNCTION=VAL  when str(FUNCTION(text)) == VAL
    not:SPEC                      when SPEC does NOT flag the text

e.g. the demo model's classifier: `callable:unipool_serve.demo.classifier:classify=code`;
for "the model complied" as the absence of a refusal: `not:keywords:I can't,I cannot`.
A judge sees only the text: a continuation broken into noise counts as "no behaviour"
unless the judge says otherwise.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

JUDGE_KINDS = "regex:PATTERN, keywords:WORD,WORD, callable:MODULE:FUNCTION[=VALUE] or not:SPEC"


class JudgeError(ValueError):
    """A --judge that cannot be built; the message names the problem and the accepted forms."""


@dataclass(frozen=True)
class Judge:
    spec: str
    shows: Callable[[str], bool]

    def rate(self, texts: Sequence[str]) -> float:
        """Share of texts showing the behaviour (0 for no texts)."""
        return sum(bool(self.shows(t)) for t in texts) / len(texts) if texts else 0.0


def parse_judge(spec: str) -> Judge:
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise JudgeError(f"--judge {spec!r}: expected {JUDGE_KINDS}")
    if kind == "not":
        inner = parse_judge(rest)
        return Judge(spec, lambda text: not inner.shows(text))
    if kind == "regex":
        try:
            pattern = re.compile(rest)
        except re.error as exc:
            raise JudgeError(f"--judge {spec!r}: invalid regular expression ({exc})") from None
        return Judge(spec, lambda text: pattern.search(text) is not None)
    if kind == "keywords":
        words = [w.strip().lower() for w in rest.split(",") if w.strip()]
        if not words:
            raise JudgeError(f"--judge {spec!r}: give at least one keyword")
        return Judge(spec, lambda text: any(w in text.lower() for w in words))
    if kind == "callable":
        target, eq, value = rest.partition("=")
        module_name, colon, attr = target.partition(":")
        if not colon or not module_name or not attr:
            raise JudgeError(f"--judge {spec!r}: expected callable:MODULE:FUNCTION[=VALUE]")
        try:
            function = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise JudgeError(f"--judge {spec!r}: cannot import {module_name}:{attr} ({exc})") from None
        if not callable(function):
            raise JudgeError(f"--judge {spec!r}: {module_name}:{attr} is not callable")
        if eq:
            return Judge(spec, lambda text: str(function(text)) == value)
        return Judge(spec, lambda text: bool(function(text)))
    raise JudgeError(f"--judge {spec!r}: unknown kind {kind!r}; expected {JUDGE_KINDS}")
