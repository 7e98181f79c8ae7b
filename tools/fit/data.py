"""Labelled examples for `unipool-steering fit`: reading, hashing and splitting them.

One JSON object per line of a JSONL file:

    {"prompt": "...", "label": 1}
    {"messages": [{"role": "user", "content": "..."}, ...], "label": 0}

label 1 marks the behaviour the profile should suppress, label 0 the behaviour to keep.
Other keys (ids, sources) are ignored. Blank lines are skipped. A chat example needs at
least one user message: its LAST user message is the one whose tokens are captured
(MASCing's "final user turn", sources.py).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

MIN_PER_LABEL = 3  # one each for training, validation and test, at the least
# train (surrogate and S), validation (the choice), test (the reported table); with examples of
# their own for the choice (--judge-data) there is no validation part and training keeps its 20%
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)


class FitDataError(ValueError):
    """The labelled data cannot be used; the message names the line or the count and the fix."""


@dataclass(frozen=True)
class Example:
    """One labelled prompt or conversation; `line` is its 1-based line in the file."""

    label: int
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) pairs
    line: int = 0

    def chat(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages or ()]

    def final_user_index(self) -> int:
        return max(i for i, (role, _) in enumerate(self.messages) if role == "user")


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    val: list[Example]
    test: list[Example]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def parse_example(text: str, where: str, line: int = 0) -> Example:
    """One JSONL line; `where` ("FILE:LINE") prefixes every error."""
    try:
        item = json.loads(text)
    except ValueError as exc:
        raise FitDataError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(item, dict):
        raise FitDataError(f"{where}: expected a JSON object with \"prompt\" or \"messages\" and \"label\"")
    label = item.get("label")
    if label not in (0, 1) or isinstance(label, bool):
        raise FitDataError(f"{where}: \"label\" must be 1 (behaviour to suppress) or 0 (to keep), got {label!r}")
    if ("prompt" in item) == ("messages" in item):
        raise FitDataError(f"{where}: give exactly one of \"prompt\" (text) or \"messages\" (a chat)")
    if "prompt" in item:
        prompt = item["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise FitDataError(f"{where}: \"prompt\" must be a non-empty string")
        return Example(label=label, prompt=prompt, line=line)
    messages = item["messages"]
    if not isinstance(messages, list) or not messages:
        raise FitDataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    pairs = []
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise FitDataError(f"{where}: messages[{i}] must be an object with string \"role\" and \"content\"")
        pairs.append((message["role"], message["content"]))
    users = [content for role, content in pairs if role == "user"]
    if not users:
        raise FitDataError(f"{where}: \"messages\" has no user message; its last user message is what is captured")
    if not users[-1].strip():
        raise FitDataError(f"{where}: the last user message is empty; it is the text whose routing is captured")
    return Example(label=label, messages=tuple(pairs), line=line)


def read_examples(path: str | Path, flag: str = "--data", per_label: int = MIN_PER_LABEL) -> tuple[list[Example], str]:
    """(examples, sha256 of the file's bytes); one-class data, or fewer than `per_label` examples
    of a label, is an error (the judge's own examples, --judge-data, are not split: 1 suffices)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FitDataError(f"{flag} {path}: cannot be read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FitDataError(f"{flag} {path}: not UTF-8 text ({exc})") from None
    examples = [parse_example(line, f"{path}:{number}", number)
                for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    check_labels(examples, str(path), per_label)
    return examples, hashlib.sha256(data).hexdigest()


def check_labels(examples: list[Example], source: str, per_label: int = MIN_PER_LABEL) -> None:
    if not examples:
        raise FitDataError(f"{source}: no examples (one JSON object per line, with \"prompt\" or \"messages\" and \"label\")")
    counts = {label: sum(e.label == label for e in examples) for label in (0, 1)}
    for label, other in ((0, 1), (1, 0)):
        if counts[label] == 0:
            raise FitDataError(f"{source}: all {len(examples)} examples have label {other}; add examples with label "
                               f"{label} ({'behaviour to keep' if label == 0 else 'behaviour to suppress'})")
    for label, count in counts.items():
        if count < per_label:
            raise FitDataError(f"{source}: label {label} has {count} example(s); need at least {per_label} of "
                               "each label (one each for the training, validation and test splits)")


def split(examples: list[Example], seed: int, validation: bool = True) -> Splits:
    """Stratified by label, shuffled by `seed`; each split keeps the file's order. Without
    `validation` the examples go to training and test only (the choice has data of its own)."""
    rng = random.Random(seed)
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    for label in (0, 1):
        members = [i for i, e in enumerate(examples) if e.label == label]
        rng.shuffle(members)
        n_val = max(1, round(SPLIT_FRACTIONS[1] * len(members))) if validation else 0
        n_test = max(1, round(SPLIT_FRACTIONS[2] * len(members)))
        parts[1].extend(members[:n_val])
        parts[2].extend(members[n_val:n_val + n_test])
        parts[0].extend(members[n_val + n_test:])
    train, val, test = ([examples[i] for i in sorted(part)] for part in parts)
    return Splits(train, val, test)
