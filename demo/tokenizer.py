"""Byte-level BPE tokenizers built locally with `tokenizers` (nothing is downloaded)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from unipool_serve.model_executor.config import CHAT_TEMPLATE

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


_SAMPLE_TEXT = [
    "The quick brown fox jumps over the lazy dog while the river runs to the sea.",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i * i)\n",
    "Shared expert pools let every layer of a mixture-of-experts model draw on one set of experts.",
    "import torch\nx = torch.zeros(4, 8)\nif x.sum() == 0:\n    x += 1\n",
    "Hello world! Numbers 0 1 2 3 4 5 6 7 8 9, punctuation: ; , . ? ( ) [ ] { } = + - * /",
]


def ascii_alphabet() -> list[str]:
    """The byte-level symbols of printable ASCII, tab and newline."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return sorted({byte_level.pre_tokenize_str(chr(b))[0][0] for b in [9, 10, *range(32, 127)]})


def train_tokenizer(texts: Iterable[str], vocab_size: int, alphabet: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with <pad>=0, <s>=1, </s>=2 and wrap it for transformers/vLLM.

    `alphabet` defaults to all 256 bytes; characters outside it are dropped when encoding.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if alphabet is None else alphabet, show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        chat_template=CHAT_TEMPLATE, model_max_length=1 << 20,
    )


def write_small_tokenizer(path: str | Path, vocab_size: int, every_byte: bool = False) -> PreTrainedTokenizerFast:
    """A tokenizer of exactly `vocab_size` tokens, trained on a few built-in lines (tiny models).

    By default every id decodes to text, whatever a random model emits: the alphabet is
    ASCII (a byte-level token can never be half of a UTF-8 character, which a detokenizer
    holds back), and when BPE saturates below `vocab_size` the rest are plain added tokens
    `<tok_N>` rather than ids the tokenizer does not know.

    `every_byte=True` takes all 256 bytes instead, like the tokenizers of the model families
    served in production: it can spell any text (an ASCII tokenizer cannot spell "é", so a
    structured-output grammar that requires it leaves no token to sample), but a random
    model may emit half a character.
    """
    alphabet = None if every_byte else ascii_alphabet()
    tokenizer = train_tokenizer(_SAMPLE_TEXT * 4, vocab_size, alphabet=alphabet)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer's base ({len(tokenizer)} tokens)")
    tokenizer.add_tokens([f"<tok_{i}>" for i in range(len(tokenizer), vocab_size)])
    tokenizer.save_pretrained(str(path))
    return tokenizer
