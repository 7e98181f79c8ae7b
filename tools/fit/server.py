"""Router logits from a running unipool-serve server, through its per-request capture fields.

Capture: one generation request per example with `"return_router_logits": true` and
`"max_tokens": 1` (the prompt is what is captured). Each choice then carries
`"router_logits"`: base64 of an `np.save`d float16 array `[tokens, num_layers,
num_experts]` for the tokens the model computed (prompt and output, minus the last token,
so with one output token: the prompt), and `"routed_experts_layers"`: the decoder layer of each
row. A model of one of vLLM's families has rows for its MoE layers only; each is put in its
decoder layer's row of the `[T, L, E]` trace (`num_layers` L, from --model's config), the rows
of layers without experts zero, as the offline sources do. For a chat, `"routed_experts_prompt_start"` skips
the tokens before the final user message; the span comes from the server's own `/tokenize`
(sources.final_user_span), so the client needs neither the tokenizer nor the template.

Before capturing, `check_model` compares the server's model fingerprint (`/ready`) with the
one of --model's config, so a profile is never made for a model other than the one captured.

Generation for a judge: the candidate profile is uploaded under its own name (the admin
key; replacing a previous candidate), requested with `"steering"`, and deleted afterwards.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import secrets
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from unipool_serve.model_executor.steering.profile import SteeringProfile
from .data import Example
from .sources import FitSourceError, blank_final_user, final_user_span


class ServerSource:
    """A unipool-serve server at `url` (its served model); `transport` is for tests."""

    def __init__(self, url: str, *, api_key: str | None = None, admin_key: str | None = None,
                 model: str | None = None, transport=None, timeout: float = 600.0, num_layers: int | None = None):
        try:
            import httpx
        except ImportError:  # shipped with vLLM; a bare install of this package may lack it
            raise FitSourceError("--server needs the httpx package: pip install httpx") from None
        self.url = url.rstrip("/")
        self.description = f"server {self.url}"
        self.admin_key = admin_key
        self.num_layers = num_layers  # decoder layers of the model: a family's MoE rows are put in their layers' rows
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, transport=transport, timeout=timeout)
        self._httpx = httpx
        self.model = model or self._served_model()

    def close(self) -> None:
        self.client.close()

    # ---- HTTP ---------------------------------------------------------------
    def _request(self, method: str, path: str, *, key: str | None = None, **kwargs) -> dict:
        headers = {"Authorization": f"Bearer {key}"} if key else None
        try:
            response = self.client.request(method, path, headers=headers, **kwargs)
        except self._httpx.HTTPError as exc:
            raise FitSourceError(f"{method} {self.url}{path} failed: {exc}") from None
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:300]
            raise FitSourceError(f"{method} {self.url}{path}: HTTP {response.status_code}: {message}")
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise FitSourceError(f"{method} {self.url}{path}: the answer is not a JSON object")
        return answer

    def _field(self, answer: dict, path: str, *keys, kind: type | tuple[type, ...] = object):
        """answer[k1][k2]..., of type `kind`; a missing or mistyped field is a FitSourceError naming it."""
        value = answer
        try:
            for key in keys:
                value = value[key]
        except (KeyError, IndexError, TypeError):
            value = None
        if value is None or not isinstance(value, kind) or isinstance(value, bool):
            where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys).lstrip(".")
            raise FitSourceError(f"{self.url}{path} answered without a valid {where}")
        return value

    def _served_model(self) -> str:
        answer = self._request("GET", "/v1/models")
        if not answer.get("data"):
            raise FitSourceError(f"{self.url}/v1/models lists no model")
        return self._field(answer, "/v1/models", "data", 0, "id", kind=str)

    def check_model(self, expected, folder) -> None:
        """The server serves the model `expected` (a SteerableModel read from `folder`), by fingerprint; a
        server that does not report its model (older than this check) is let through to the shape check."""
        served = self._request("GET", "/ready").get("model")
        if not isinstance(served, dict) or not isinstance(served.get("fingerprint"), str):
            return
        if served["fingerprint"] != expected.fingerprint:
            raise FitSourceError(f"{self.url} serves {served.get('architecture', '?')} (fingerprint "
                                 f"{served['fingerprint']}) but --model {folder} is {expected.architecture} "
                                 f"(fingerprint {expected.fingerprint}): point --model at the served model's folder")

    def _tokens(self, chat: list[dict[str, str]]) -> list[int]:
        body = {"model": self.model, "messages": chat, "add_generation_prompt": True}
        tokens = self._field(self._request("POST", "/tokenize", json=body), "/tokenize", "tokens", kind=list)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise FitSourceError(f"{self.url}/tokenize answered with tokens that are not integers")
        return tokens

    # ---- capture --------------------------------------------------------------
    def capture(self, examples: Sequence[Example], progress: bool = True,
                whole_prompt: bool = False) -> list[torch.Tensor]:
        traces = []
        for example in tqdm(examples, desc=f"capture ({self.url})", unit="example", disable=not progress):
            body = {"model": self.model, "max_tokens": 1, "temperature": 0, "return_router_logits": True}
            if example.prompt is not None:
                start, end, expected = 0, None, None
                path, body["prompt"] = "/v1/completions", example.prompt
            elif whole_prompt:
                start, end, expected = 0, None, None
                path, body["messages"] = "/v1/chat/completions", example.chat()
            else:
                full = self._tokens(example.chat())
                start, end = final_user_span(full, self._tokens(blank_final_user(example)))
                expected = len(full)
                path, body["messages"] = "/v1/chat/completions", example.chat()
                body["routed_experts_prompt_start"] = start
            answer = self._request("POST", path, json=body)
            prompt_tokens = self._field(answer, path, "usage", "prompt_tokens", kind=int)
            if expected is not None and prompt_tokens != expected:
                raise FitSourceError(f"line {example.line}: /tokenize gave {expected} prompt tokens but the chat "
                                     f"request used {prompt_tokens}; the span of the final user message is unknown")
            if end is None:
                end = prompt_tokens
            if end <= start:
                raise FitSourceError(f"line {example.line}: {path} reports {prompt_tokens} prompt tokens: "
                                     "nothing to capture")
            logits = self._decode(answer, path, example)
            if logits.shape[0] < end - start:
                raise FitSourceError(f"line {example.line}: {path} returned router_logits for {logits.shape[0]} "
                                     f"tokens, expected at least {end - start} (prompt tokens {start}..{end})")
            rows = torch.from_numpy(np.ascontiguousarray(logits[: end - start]))  # [T, rows, E] as sent (fp16)
            traces.append(self._in_layer_rows(rows, answer, path, example))
        return traces

    def _in_layer_rows(self, rows: torch.Tensor, answer: dict, path: str, example: Example) -> torch.Tensor:
        """[T, L, E]: each captured row in the row of its decoder layer (`routed_experts_layers`)."""
        layers = answer["choices"][0].get("routed_experts_layers")
        if layers is None or self.num_layers is None:
            return rows  # a server that does not name its rows: every layer, in order (the shape check follows)
        if (not isinstance(layers, list) or len(layers) != rows.shape[1] or len(set(layers)) != len(layers)
                or not all(isinstance(l, int) and not isinstance(l, bool) and 0 <= l < self.num_layers
                           for l in layers)):
            raise FitSourceError(f"line {example.line}: {path} returned routed_experts_layers {layers!r:.80}, expected "
                                 f"{rows.shape[1]} distinct decoder layers below {self.num_layers}")
        if layers == list(range(self.num_layers)):
            return rows
        trace = torch.zeros(rows.shape[0], self.num_layers, rows.shape[2], dtype=rows.dtype)
        trace[:, layers] = rows
        return trace

    def _decode(self, answer: dict, path: str, example: Example) -> np.ndarray:
        choice = self._field(answer, path, "choices", 0, kind=dict)
        encoded = choice.get("router_logits")
        if not isinstance(encoded, str):
            raise FitSourceError(f"{self.url}{path} returned no \"router_logits\": the server does not support "
                                 "per-request routing capture (unipool-serve with return_router_logits)")
        try:
            array = np.load(io.BytesIO(base64.b64decode(encoded)), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise FitSourceError(f"line {example.line}: router_logits is not a base64 .npy array ({exc})") from None
        if not isinstance(array, np.ndarray) or array.ndim != 3 or array.dtype.kind != "f":
            raise FitSourceError(f"line {example.line}: router_logits is {getattr(array, 'dtype', '?')} of shape "
                                 f"{list(getattr(array, 'shape', []))}, expected floats [tokens, layers, experts]")
        if not np.isfinite(array).all():
            raise FitSourceError(f"line {example.line}: router_logits holds non-finite values (NaN or inf)")
        return array

    # ---- generation -------------------------------------------------------------
    def generate(self, examples: Sequence[Example], profile: SteeringProfile | None, max_new_tokens: int,
                 progress: bool = True) -> list[str]:
        if profile is not None:
            if not self.admin_key:
                raise FitSourceError("judging through a server uploads candidate profiles: pass --admin-key")
            # a fresh name: a candidate must never replace (and then delete) a profile the server serves
            profile = dataclasses.replace(profile, name=f"{profile.name[:40]}.fit-candidate-{secrets.token_hex(4)}")
            self._request("POST", "/v1/steering/profiles", key=self.admin_key, content=profile.to_bytes())
        try:
            texts = []
            for example in tqdm(examples, desc=f"generate ({self.url})", unit="prompt", disable=not progress):
                body = {"model": self.model, "max_tokens": max_new_tokens, "min_tokens": max_new_tokens,
                        "temperature": 0}
                if profile is not None:
                    body["steering"] = profile.name
                if example.prompt is not None:
                    answer = self._request("POST", "/v1/completions", json=body | {"prompt": example.prompt})
                    texts.append(self._field(answer, "/v1/completions", "choices", 0, "text", kind=str))
                else:
                    answer = self._request("POST", "/v1/chat/completions", json=body | {"messages": example.chat()})
                    message = self._field(answer, "/v1/chat/completions", "choices", 0, "message", kind=dict)
                    texts.append(message.get("content") or "")
            return texts
        finally:
            if profile is not None:
                self._request("DELETE", f"/v1/steering/profiles/{profile.name}", key=self.admin_key)
