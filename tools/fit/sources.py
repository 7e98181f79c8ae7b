"""Where router logits come from: the reference model (offline, exact) or a running server.

A logits source captures, for each example, the raw router logits of the tokens MASCing
uses, `[T, L, E]` (T tokens, L decoder layers, E experts of each layer's pool; a layer
without experts, in some of vLLM's families, has a row of zeros; fp32 from the
reference model, fp16 as a server sends them; the surrogate computes in fp32), and
generates greedy continuations under a steering profile (for a judge):

- plain prompt: every prompt token, encoded as a completions request encodes it;
- chat: the tokens of the LAST user message, inside the chat template the server would
  apply (MASCing's "final user turn"). The span is found without knowing the template:
  the chat is rendered twice, once as is and once with that message's content empty,
  and the span is what lies between the two renderings' common prefix and common
  suffix. (Were a token to straddle the content's edge, it would count as part of it.)

`ReferenceSource` runs `UniPoolForCausalLM` on CPU (or --device);
`family_source.FamilySource` runs transformers' own model of one of vLLM's MoE families (its
MoE layers' logits in their decoder layers' rows, the rows of layers without experts zero);
`server.ServerSource` asks a unipool-serve server through its routing-capture fields.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from unipool_serve.model_executor.steering.profile import SteeringProfile
from .data import Example


class FitSourceError(RuntimeError):
    """The source could not give logits or text; the message says which request and why."""


class LogitsSource(Protocol):
    description: str

    def capture(self, examples: Sequence[Example], progress: bool = True,
                whole_prompt: bool = False) -> list[torch.Tensor]:
        """Per example, raw router logits of its captured tokens: [T, L, E] (fp32 or fp16); every prompt
        token with `whole_prompt` (what a served probe scores), else a chat's final user message."""

    def generate(self, examples: Sequence[Example], profile: SteeringProfile | None, max_new_tokens: int,
                 progress: bool = True) -> list[str]:
        """Greedy continuations of exactly max_new_tokens (end of text banned) under `profile`."""


def final_user_span(full: Sequence[int], blank: Sequence[int]) -> tuple[int, int]:
    """[start, end) of the final user message's tokens in `full`, given `blank`: the same chat
    rendered with that message's content empty."""
    limit = min(len(full), len(blank))
    start = 0
    while start < limit and full[start] == blank[start]:
        start += 1
    suffix = 0
    while suffix < limit - start and full[-1 - suffix] == blank[-1 - suffix]:
        suffix += 1
    end = len(full) - suffix
    if end <= start:
        raise FitSourceError("the final user message renders to no tokens of its own in the chat template")
    return start, end


def blank_final_user(example: Example) -> list[dict[str, str]]:
    chat = example.chat()
    chat[example.final_user_index()]["content"] = ""
    return chat


class TokenizedSource(abc.ABC):
    """A model run in this process, with its folder's tokenizer and chat template: which tokens an example
    captures, and greedy generation (subclasses load the model and say how it is steered)."""

    description: str
    model: torch.nn.Module
    config: object

    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        from transformers import AutoTokenizer

        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))

    def _chat_ids(self, chat: list[dict[str, str]]) -> list[int]:
        out = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if isinstance(out, Mapping) else out)

    def token_span(self, example: Example, whole_prompt: bool = False) -> tuple[list[int], int, int]:
        """(prompt token ids, start, end) of the captured tokens."""
        if example.prompt is not None:
            ids = list(self.tokenizer(example.prompt)["input_ids"])
            return ids, 0, len(ids)
        full = self._chat_ids(example.chat())
        if whole_prompt:
            return full, 0, len(full)
        return (full, *final_user_span(full, self._chat_ids(blank_final_user(example))))

    @abc.abstractmethod
    def _steering(self, profile: SteeringProfile | None, batch: int) -> tuple[dict, contextlib.AbstractContextManager]:
        """(keyword arguments of each forward, a context around the whole generation) for `profile`."""

    @torch.no_grad()
    def generate(self, examples: Sequence[Example], profile: SteeringProfile | None, max_new_tokens: int,
                 progress: bool = True) -> list[str]:
        from transformers.cache_utils import DynamicCache

        prompts = [self.token_span(e)[0] for e in examples]
        groups: dict[int, list[int]] = {}
        for i, ids in enumerate(prompts):  # equal lengths only: no padding enters the computation
            groups.setdefault(len(ids), []).append(i)
        eos = self.tokenizer.eos_token_id
        texts = [""] * len(prompts)
        bar = tqdm(total=len(prompts), desc=f"generate ({self.description})", unit="prompt", disable=not progress)
        for members in groups.values():
            batch = len(members)
            steer, context = self._steering(profile, batch)
            step_input = torch.tensor([prompts[i] for i in members], device=self.device)
            cache, new = DynamicCache(config=self.config), []
            with context:
                for _ in range(max_new_tokens):
                    out = self.model(input_ids=step_input, past_key_values=cache, use_cache=True, logits_to_keep=1,
                                     **steer)
                    logits = out.logits[:, -1].float()
                    if eos is not None:
                        logits[:, eos] = float("-inf")  # as vLLM's min_tokens = max_tokens
                    step_input = logits.argmax(dim=-1, keepdim=True)  # [B, 1]
                    new.append(step_input)
                    cache = out.past_key_values
            tokens = torch.cat(new, dim=1).tolist() if new else [[] for _ in members]
            for row, i in enumerate(members):
                texts[i] = self.tokenizer.decode(tokens[row], skip_special_tokens=True)
            bar.update(batch)
        bar.close()
        return texts


class ReferenceSource(TokenizedSource):
    """The pure-PyTorch reference model of a model folder in this project's format."""

    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        from unipool_serve.model_executor.reference.hf_registration import register_hf
        from unipool_serve.model_executor.reference.model import UniPoolForCausalLM

        super().__init__(model_dir, device)
        register_hf()
        self.description = f"reference model {model_dir}"
        self.model = UniPoolForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval().to(self.device)
        self.config = self.model.config

    @torch.no_grad()
    def capture(self, examples: Sequence[Example], progress: bool = True,
                whole_prompt: bool = False) -> list[torch.Tensor]:
        traces = []
        for example in tqdm(examples, desc="capture (reference model)", unit="example", disable=not progress):
            ids, start, end = self.token_span(example, whole_prompt)
            x = torch.tensor([ids], device=self.device)
            logits = self.model(input_ids=x, output_router_logits=True, logits_to_keep=1)["router_logits"]
            traces.append(torch.stack(logits, dim=1)[start:end].float().cpu())  # [T, L, E]
        return traces

    def _steering(self, profile: SteeringProfile | None, batch: int) -> tuple[dict, contextlib.AbstractContextManager]:
        if profile is None:
            return {}, contextlib.nullcontext()
        return {"steering_bias": profile.bias_rows().to(self.device).expand(batch, -1, -1),
                "steering_mask": profile.mask_rows().to(self.device).expand(batch, -1, -1)}, contextlib.nullcontext()
