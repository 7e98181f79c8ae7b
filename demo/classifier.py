"""Tell prose from code in short texts: the yardstick of the demo model's two behaviours.

A transparent count of surface markers, no learned weights:

* code markers (each occurrence counts once):
  - the characters ``( ) [ ] { } = : _ # < > + *`` and ``.`` between two word characters
    (attribute access such as ``line.split``);
  - the keywords ``def return import class self None True False elif print len range
    append lambda`` as whole words (each counts 2);
  - a line that starts with four spaces (indentation; counts 2).
* prose markers:
  - English function words ``the a an and was were of to he she they we his her their
    that with said there when because while but so my our some many`` as whole words,
    case-insensitive;
  - a sentence end: ``.``, ``!`` or ``?`` after a letter and followed by whitespace or
    the end of the text (counts 2).

``score = (code - prose) / (code + prose)`` lies in [-1, 1]. ``classify`` answers
``"code"`` when score > 0, ``"prose"`` when score < 0 and ``"other"`` when there is no
marker at all or the counts tie (empty or degenerate text, e.g. a run of one repeated
word). Punctuation shared by both kinds (commas, quotes, periods inside numbers) is
ignored. The accuracy on held-out corpus samples is measured by
scripts/train_demo_model.py and recorded in models/unipool-demo/README.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CODE_CHARS = frozenset("()[]{}=:_#<>+*")
CODE_KEYWORDS = frozenset(
    "def return import class self None True False elif print len range append lambda".split()
)
PROSE_WORDS = frozenset(
    "the a an and was were of to he she they we his her their that with said there when "
    "because while but so my our some many".split()
)
KEYWORD_WEIGHT = 2
INDENT_WEIGHT = 2
SENTENCE_END_WEIGHT = 2

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ATTR_DOT = re.compile(r"(?<=\w)\.(?=\w)")
_SENTENCE_END = re.compile(r"(?<=[A-Za-z])[.!?](?=\s|$)")
_INDENT = re.compile(r"^ {4}", re.MULTILINE)


@dataclass(frozen=True)
class Markers:
    code: int
    prose: int

    @property
    def score(self) -> float:
        total = self.code + self.prose
        return 0.0 if total == 0 else (self.code - self.prose) / total


def markers(text: str) -> Markers:
    """Count the code and prose markers of `text` (see the module docstring)."""
    code = sum(1 for ch in text if ch in CODE_CHARS)
    code += len(_ATTR_DOT.findall(text))
    code += INDENT_WEIGHT * len(_INDENT.findall(text))
    prose = SENTENCE_END_WEIGHT * len(_SENTENCE_END.findall(text))
    for word in _WORD.findall(text):
        if word in CODE_KEYWORDS:
            code += KEYWORD_WEIGHT
        elif word.lower() in PROSE_WORDS:
            prose += 1
    return Markers(code, prose)


def code_score(text: str) -> float:
    """In [-1, 1]: > 0 leans to code, < 0 to prose, 0 undecided."""
    return markers(text).score


def classify(text: str) -> str:
    """'code', 'prose' or 'other' (no markers, or a tie)."""
    score = code_score(text)
    if score > 0:
        return "code"
    if score < 0:
        return "prose"
    return "other"
