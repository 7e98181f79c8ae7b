"""The synthetic corpus of the bundled demo model (models/unipool-demo).

Two kinds of text, each from a small random grammar, so that the model has two
clearly separable behaviours that router steering can switch between:

* prose: English-like narrative sentences grouped into paragraphs;
* code:  Python-like modules (imports, functions, classes, loops, conditions).

Both grammars draw on one shared stock of nouns (``river``, ``stone``, ``letter``
...), so a word alone does not give the kind away: the structure does.
Everything is generated from a ``random.Random`` seeded by the caller, so the
corpus is identical on every machine and every run.
"""

from __future__ import annotations

import random

# ---------------------------------------------------------------- shared stock
NOUNS = [
    "river", "stone", "window", "garden", "letter", "house", "road", "tree", "bridge", "market",
    "village", "teacher", "child", "boat", "book", "lamp", "door", "field", "hill", "city",
    "song", "story", "number", "name", "table", "word", "page", "box", "note", "clock",
    "friend", "farmer", "baker", "island", "candle", "basket", "ticket", "train", "cloud", "apple",
]
PLURALS = {n: (n + "es" if n.endswith(("x", "ch")) else "cities" if n == "city" else "children" if n == "child" else n + "s") for n in NOUNS}

# ---------------------------------------------------------------- prose grammar
NAMES = ["Anna", "Tom", "Mira", "Jonas", "Clara", "Peter", "Lena", "Oskar", "Ruth", "Samuel", "Ida", "Felix"]
ADJECTIVES = [
    "old", "small", "quiet", "bright", "dark", "green", "cold", "warm", "long", "empty", "heavy",
    "gentle", "strange", "busy", "tall", "narrow", "silver", "young", "wet", "golden",
]
VERBS_T = [
    "found", "opened", "carried", "watched", "painted", "counted", "closed", "followed", "read",
    "wrote", "crossed", "cleaned", "built", "sold", "lost", "kept", "left", "saw", "heard", "remembered",
]
VERBS_I = ["slept", "waited", "smiled", "walked", "laughed", "stopped", "listened", "returned", "sang", "wandered", "rested", "worked"]
ADVERBS = ["slowly", "quietly", "again", "often", "carefully", "early", "later", "soon", "never", "suddenly", "together", "alone"]
PREPS = ["near", "behind", "under", "across", "beside", "through", "along", "inside", "past", "above", "over", "around"]
TIMES = [
    "In the morning", "At night", "Every spring", "After the rain", "Before dinner", "On Sunday",
    "Long ago", "That winter", "Later that day", "In the evening", "One summer", "At dawn",
]
CONJS = ["because", "while", "when", "but", "so", "until", "although", "and"]
PRONOUNS = ["he", "she", "they", "we"]
FEELINGS = ["happy", "tired", "afraid", "glad", "sorry", "calm", "curious", "proud"]


def _np(rng: random.Random, *, plural: bool = False) -> str:
    """A noun phrase: 'the old river', 'a letter', 'her friend', 'the stones'."""
    noun = rng.choice(NOUNS)
    word = PLURALS[noun] if plural else noun
    det = rng.choice(["the", "the", "a", "his", "her", "their", "my"] if not plural else ["the", "the", "some", "many", "her", "our"])
    if det == "a" and word[0] in "aeiou":
        det = "an"
    if rng.random() < 0.45:
        adj = rng.choice(ADJECTIVES)
        if det == "an" and adj[0] not in "aeiou":
            det = "a"
        elif det == "a" and adj[0] in "aeiou":
            det = "an"
        return f"{det} {adj} {word}"
    return f"{det} {word}"


def _subject(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.35:
        return rng.choice(NAMES)
    if r < 0.55:
        return rng.choice(PRONOUNS)
    return _np(rng, plural=rng.random() < 0.2)


def _clause(rng: random.Random) -> str:
    subj = _subject(rng)
    r = rng.random()
    if r < 0.45:
        s = f"{subj} {rng.choice(VERBS_T)} {_np(rng, plural=rng.random() < 0.25)}"
        if rng.random() < 0.5:
            s += f" {rng.choice(PREPS)} {_np(rng)}"
        return s
    if r < 0.75:
        s = f"{subj} {rng.choice(VERBS_I)}"
        if rng.random() < 0.5:
            s += f" {rng.choice(ADVERBS)}"
        if rng.random() < 0.6:
            s += f" {rng.choice(PREPS)} {_np(rng)}"
        return s
    if r < 0.9:
        verb = "were" if subj in ("they", "we") or subj.split()[-1] in PLURALS.values() else "was"
        return f"{subj} {verb} {rng.choice(ADJECTIVES + FEELINGS)}"
    return f"{subj} said that {_np(rng)} was {rng.choice(ADJECTIVES)}"


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def prose_sentence(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.2:
        body = f"{rng.choice(TIMES)}, {_clause(rng)}"
    elif r < 0.5:
        body = f"{_clause(rng)} {rng.choice(CONJS)} {_clause(rng)}"
    elif r < 0.6:
        body = f"There was {_np(rng)} {rng.choice(PREPS)} {_np(rng)}"
    elif r < 0.68:
        name = rng.choice(NAMES)
        return f"\"Where is {_np(rng)}?\" asked {name}."
    else:
        body = _clause(rng)
    return _cap(body) + "."


def prose_document(rng: random.Random) -> str:
    paragraphs = []
    for _ in range(rng.randint(1, 3)):
        paragraphs.append(" ".join(prose_sentence(rng) for _ in range(rng.randint(2, 6))))
    return "\n\n".join(paragraphs)


# ---------------------------------------------------------------- code grammar
CODE_VERBS = ["count", "find", "load", "read", "build", "sort", "clean", "update", "check", "merge", "split", "collect", "parse", "make"]
MODULES = ["os", "sys", "json", "math", "random", "re", "time", "itertools"]
FROM_IMPORTS = [("collections", "defaultdict"), ("collections", "Counter"), ("pathlib", "Path"), ("typing", "List"), ("dataclasses", "dataclass")]
BUILTINS = ["len", "sum", "max", "min", "sorted", "list", "str", "int", "abs"]
COMMENTS = ["update the count", "skip empty values", "keep the result", "check the limit", "collect the names", "build the table"]
ATTRS = ["name", "count", "size", "items", "value", "limit", "path", "total"]


def _ident(rng: random.Random) -> str:
    r = rng.random()
    noun = rng.choice(NOUNS)
    if r < 0.4:
        return noun
    if r < 0.6:
        return PLURALS[noun]
    if r < 0.8:
        return f"{noun}_{rng.choice(['count', 'list', 'name', 'size', 'index', 'map'])}"
    return rng.choice(["total", "result", "index", "value", "key", "item", "data", "line", "i", "n"])


class _CodeWriter:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.lines: list[str] = []

    def emit(self, depth: int, text: str) -> None:
        self.lines.append("    " * depth + text)

    def expr(self, names: list[str], depth: int = 0) -> str:
        rng = self.rng
        var = rng.choice(names)
        r = rng.random()
        if r < 0.22 or depth > 1:
            return var if rng.random() < 0.7 else str(rng.randint(0, 20))
        if r < 0.38:
            return f"{var} {rng.choice(['+', '-', '*', '//', '%'])} {rng.randint(1, 10)}"
        if r < 0.5:
            return f"{rng.choice(BUILTINS)}({var})"
        if r < 0.6:
            return f"{var}[{rng.choice([str(rng.randint(0, 5)), rng.choice(names)])}]"
        if r < 0.68:
            return f"\"{rng.choice(NOUNS)}\""
        if r < 0.76:
            return rng.choice(["[]", "{}", "None", "0", "True", "False"])
        if r < 0.86:
            return f"{rng.choice(CODE_VERBS)}_{rng.choice(NOUNS)}({var})"
        if r < 0.93:
            return f"{var}.{rng.choice(['get', 'pop', 'strip', 'split', 'lower', 'items'])}()"
        return f"[{rng.choice(names)} for {rng.choice(names)} in {var}]"

    def cond(self, names: list[str]) -> str:
        rng = self.rng
        var = rng.choice(names)
        return rng.choice([
            f"{var} > {rng.randint(0, 10)}", f"{var} == {self.expr(names, 2)}", f"not {var}",
            f"{var} in {rng.choice(names)}", f"len({var}) > {rng.randint(0, 3)}", f"{var} is None",
            f"{var} < {rng.choice(names)}",
        ])

    def block(self, names: list[str], depth: int, budget: int) -> None:
        rng = self.rng
        for _ in range(rng.randint(1, budget)):
            r = rng.random()
            if r < 0.3 or depth >= 3:
                target = _ident(rng)
                op = "=" if rng.random() < 0.75 else rng.choice(["+=", "-=", "*="])
                self.emit(depth, f"{target} {op} {self.expr(names)}")
                if target not in names:
                    names = names + [target]
            elif r < 0.45:
                item = rng.choice(["item", "line", "key", "value", "i", rng.choice(NOUNS)])
                it = rng.choice([rng.choice(names), f"range({rng.randint(2, 20)})", f"enumerate({rng.choice(names)})", f"{rng.choice(names)}.items()"])
                if it.startswith("enumerate"):
                    item = f"i, {item}"
                elif it.endswith(".items()"):
                    item = "key, value"
                self.emit(depth, f"for {item} in {it}:")
                self.block(names + item.replace(",", " ").split(), depth + 1, 2)
            elif r < 0.6:
                self.emit(depth, f"if {self.cond(names)}:")
                self.block(names, depth + 1, 2)
                if rng.random() < 0.35:
                    self.emit(depth, "else:")
                    self.block(names, depth + 1, 1)
            elif r < 0.68:
                var = rng.choice(names)
                self.emit(depth, f"while {var} < {rng.randint(2, 50)}:")
                self.emit(depth + 1, f"{var} += {rng.randint(1, 3)}")
            elif r < 0.78:
                self.emit(depth, f"{rng.choice(names)}.append({self.expr(names)})")
            elif r < 0.88:
                self.emit(depth, f"print({self.expr(names)})")
            elif r < 0.94:
                self.emit(depth, f"# {rng.choice(COMMENTS)}")
            else:
                self.emit(depth, f"{rng.choice(names)}[{self.expr(names, 2)}] = {self.expr(names)}")

    def function(self, depth: int = 0, method: bool = False) -> None:
        rng = self.rng
        args = [_ident(rng) for _ in range(rng.randint(0 if not method else 0, 3))]
        args = list(dict.fromkeys(args))
        params = (["self"] if method else []) + args
        name = f"{rng.choice(CODE_VERBS)}_{rng.choice(NOUNS + [PLURALS[n] for n in NOUNS[:10]])}"
        self.emit(depth, f"def {name}({', '.join(params)}):")
        names = args + (["self." + rng.choice(ATTRS)] if method else []) or ["result"]
        if not args and not method:
            self.emit(depth + 1, f"result = {rng.choice(['[]', '{}', '0', 'None'])}")
            names = ["result"]
        self.block(names, depth + 1, 4)
        self.emit(depth + 1, f"return {self.expr(names)}")

    def klass(self) -> None:
        rng = self.rng
        cls = rng.choice(NOUNS).capitalize() + rng.choice(["Table", "List", "Store", "Reader", "Counter", "Builder"])
        self.emit(0, f"class {cls}:")
        attrs = list(dict.fromkeys(rng.choice(ATTRS) for _ in range(rng.randint(1, 3))))
        self.emit(1, f"def __init__(self, {', '.join(attrs)}):")
        for a in attrs:
            self.emit(2, f"self.{a} = {a}")
        for _ in range(rng.randint(1, 2)):
            self.lines.append("")
            self.function(1, method=True)


def code_document(rng: random.Random) -> str:
    w = _CodeWriter(rng)
    if rng.random() < 0.6:
        for mod in rng.sample(MODULES, rng.randint(1, 2)):
            w.emit(0, f"import {mod}")
        if rng.random() < 0.4:
            pkg, name = rng.choice(FROM_IMPORTS)
            w.emit(0, f"from {pkg} import {name}")
        w.lines.append("")
    for i in range(rng.randint(1, 3)):
        if i:
            w.lines.append("")
        if rng.random() < 0.25:
            w.klass()
        else:
            w.function()
    if rng.random() < 0.2:
        w.lines.append("")
        w.emit(0, "if __name__ == \"__main__\":")
        w.emit(1, f"print({rng.choice(CODE_VERBS)}_{rng.choice(NOUNS)}({_ident(rng)}))")
    return "\n".join(w.lines) + "\n"


def documents(kind: str, count: int, seed: int) -> list[str]:
    """`count` documents of `kind` ('prose' or 'code') from a generator seeded with `seed`."""
    if kind not in ("prose", "code"):
        raise ValueError(f"kind must be 'prose' or 'code', got {kind!r}")
    rng = random.Random(f"{kind}-{seed}")
    make = prose_document if kind == "prose" else code_document
    return [make(rng) for _ in range(count)]


# Seeds of the corpus splits; the training script and the evaluation never overlap.
TRAIN_SEED, CALIBRATION_SEED, HELDOUT_SEED = 0, 1, 2
