"""Router logits offline for a model of one of vLLM's MoE families: transformers' own model.

`unipool-steering fit --model DIR` on a folder of a supported family (Mixtral, Qwen2/3-MoE,
OLMoE, DeepSeek, gpt-oss; steering/families.py) runs the folder's model with transformers
(fp32, on --device) and `output_router_logits`, which gives one `[T, E]` tensor per MoE
layer: the raw logits of its router, before any steering, exactly what the engine's gate
hook captures. Each is put in its decoder layer's row, as a server's capture names it
(`routed_experts_layers`): the MoE layers in order, so a profile's row l steers decoder
layer l. Layers without experts (DeepSeek's first_k_dense_replace, Qwen's mlp_only_layers)
get a row of zeros, which the surrogate sees as constant and S never moves (sigma_t is 0).

Judged generation steers the model as the engine steers a family
(model_executor/reference/family_steering.py: the gate's logits, grouped selection, a routed
budget of zero). Other routed budgets are not modelled offline: use --server for them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from unipool_serve.model_executor.reference import family_steering
from unipool_serve.model_executor.steering import contract
from unipool_serve.model_executor.steering.profile import SteeringProfile
from unipool_serve.model_executor.steering.shape import SteerableModel
from .data import Example
from .sources import FitSourceError, TokenizedSource


def load_family_model(model_dir: str | Path, device: torch.device) -> torch.nn.Module:
    """transformers' model of the folder, fp32, eval."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval().to(device)


class FamilySource(TokenizedSource):
    """transformers' own model of a family's folder; `model`: an already loaded one (tests)."""

    def __init__(self, model_dir: str | Path, shape: SteerableModel, device: str = "cpu", model=None):
        try:
            super().__init__(model_dir, device)
            self.model = model if model is not None else load_family_model(model_dir, self.device)
        except (OSError, ValueError, RuntimeError) as exc:  # no weights, no tokenizer, a config transformers refuses
            raise FitSourceError(f"--model {model_dir}: transformers cannot load its {shape.architecture} model and "
                                 f"tokenizer ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
        self.description = f"transformers model {model_dir}"
        self.shape = shape
        self.config = self.model.config
        self.layers = family_steering.moe_layers(self.model)  # row r of output_router_logits -> decoder layer
        expected = [l for l in range(shape.num_layers) if l not in shape.dense_layers]
        if self.layers != expected:
            raise FitSourceError(f"transformers' model of {model_dir} has routers in layers {self.layers}, but its "
                                 f"config says the MoE layers are {expected}")

    @torch.no_grad()
    def capture(self, examples: Sequence[Example], progress: bool = True,
                whole_prompt: bool = False) -> list[torch.Tensor]:
        traces = []
        for example in tqdm(examples, desc="capture (transformers model)", unit="example", disable=not progress):
            ids, start, end = self.token_span(example, whole_prompt)
            out = self.model(input_ids=torch.tensor([ids], device=self.device), output_router_logits=True,
                             logits_to_keep=1)
            rows = torch.stack(out.router_logits, dim=1)[start:end].float().cpu()  # [T, R, E]
            trace = torch.zeros(rows.shape[0], self.shape.num_layers, rows.shape[2])
            trace[:, self.layers] = rows
            traces.append(trace)  # [T, L, E]
        return traces

    def _steering(self, profile: SteeringProfile | None, batch: int) -> tuple[dict, contextlib.AbstractContextManager]:
        if profile is None:
            return {}, contextlib.nullcontext()
        budget = contract.parse_budget(profile.expert_budget)
        if budget is not None and 0 < budget < self.shape.top_k:
            raise FitSourceError(f"profile {profile.name}: an expert budget of {budget} is not modelled offline for "
                                 "vLLM's families; judge it through a server (--server)")
        return {}, family_steering.steered(self.model, self.shape.router_kind, profile.bias_rows(),
                                           profile.mask_rows(), routed_scale=0.0 if budget == 0 else 1.0)
