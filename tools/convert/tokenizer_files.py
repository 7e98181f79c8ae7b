"""The tokenizer of a converted model: GPT-2 BPE files (Megatron's GPT2BPETokenizer) or an HF folder.

GPT-2 BPE is rebuilt locally with `tokenizers` (nothing is downloaded): byte-level BPE from
`vocab.json` + `merges.txt`, GPT-2's pre-tokenizer regex, no prefix space, and
`<|endoftext|>` as the special end-of-document token Megatron appends to every document.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from unipool_serve.model_executor.config import CHAT_TEMPLATE

from .errors import ConversionError

END_OF_TEXT = "<|endoftext|>"


@dataclass
class ChosenTokenizer:
    tokenizer: PreTrainedTokenizerFast
    source: str  # for the summary line


def gpt2_bpe(vocab_file: Path, merge_file: Path, max_length: int) -> PreTrainedTokenizerFast:
    """GPT-2's byte-level BPE from its vocab and merges files."""
    for flag, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
        if not Path(path).is_file():
            raise ConversionError(f"{flag} {path} is not a file")
    try:
        model = models.BPE.from_file(str(vocab_file), str(merge_file))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"--vocab-file {vocab_file} / --merge-file {merge_file}: not GPT-2 BPE files "
                              f"({first[:200]})") from exc
    tok = Tokenizer(model)
    if tok.token_to_id(END_OF_TEXT) is None:
        raise ConversionError(f"--vocab-file {vocab_file} has no {END_OF_TEXT} entry, which Megatron's "
                              "GPT2BPETokenizer requires: not the vocabulary this model was trained with")
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(END_OF_TEXT, special=True, normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT,
        chat_template=CHAT_TEMPLATE, model_max_length=max_length,
    )


def hf_folder(folder: Path) -> PreTrainedTokenizerFast:
    """A transformers tokenizer saved in a local folder (fast tokenizers only: vLLM needs tokenizer.json)."""
    if not Path(folder).is_dir():
        raise ConversionError(f"--tokenizer {folder} is not a folder")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"--tokenizer {folder}: cannot load a tokenizer from it ({first[:200]})") from exc
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise ConversionError(f"--tokenizer {folder} holds a slow tokenizer only; save a fast one (tokenizer.json)")
    return tok


def choose_tokenizer(run, vocab_file: Path | None, merge_file: Path | None, folder: Path | None,
                     vocab_size: int, max_length: int) -> ChosenTokenizer:
    """The tokenizer the flags name, else the one the run's args name if it exists on this machine."""
    if folder is not None and (vocab_file or merge_file):
        raise ConversionError("pass either --tokenizer or --vocab-file/--merge-file, not both")
    if (vocab_file is None) != (merge_file is None):
        raise ConversionError("GPT-2 BPE needs both --vocab-file and --merge-file")
    if folder is not None:
        chosen = ChosenTokenizer(hf_folder(folder), f"tokenizer folder {folder}")
    elif vocab_file is not None:
        chosen = ChosenTokenizer(gpt2_bpe(vocab_file, merge_file, max_length), f"GPT-2 BPE {vocab_file}")
    elif (run.tokenizer_type == "GPT2BPETokenizer" and run.vocab_file and run.merge_file
          and Path(run.vocab_file).is_file() and Path(run.merge_file).is_file()):
        chosen = ChosenTokenizer(gpt2_bpe(Path(run.vocab_file), Path(run.merge_file), max_length),
                                 f"the run's GPT-2 BPE files {run.vocab_file}")
    elif run.tokenizer_type == "HuggingFaceTokenizer" and run.tokenizer_model and Path(run.tokenizer_model).is_dir():
        chosen = ChosenTokenizer(hf_folder(Path(run.tokenizer_model)), f"the run's tokenizer {run.tokenizer_model}")
    else:
        named = run.vocab_file or run.tokenizer_model
        where = f"; the run's args name {named}, which is not on this machine" if named else ""
        raise ConversionError("no tokenizer: pass --vocab-file and --merge-file (GPT-2 BPE, Megatron's "
                              f"GPT2BPETokenizer) or --tokenizer HF_FOLDER{where}")
    if len(chosen.tokenizer) > vocab_size:
        raise ConversionError(f"the tokenizer ({chosen.source}) has {len(chosen.tokenizer)} tokens, more than the "
                              f"model's padded_vocab_size={vocab_size}: it is not this model's tokenizer")
    return chosen
