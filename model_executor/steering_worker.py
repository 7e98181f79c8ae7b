"""Worker class that feeds per-request steering into the model and serves our RPCs.

Select it with `--worker-cls unipool_serve.model_executor.steering_worker.SteeringWorker`
(`unipool-serve` does). It subclasses the platform's own worker (CPU or CUDA) and
hooks the V1 model runner's `_model_forward`: before each real step it writes each
token's profile row into the model's persistent index buffer (in place; 0 = no
steering). Dummy and warm-up runs call the model directly, bypass the hook and so
see whatever the buffer held: every hooked step therefore zeroes the whole slice it
uses first, and the worker zeroes the buffer once after warm-up.

Requests name their profile through `SamplingParams.extra_args` as the API layer
writes them: `unipool_steering` (name), `unipool_steering_slot` (table row) and
`unipool_steering_hash` (content hash prefix). A request whose hash no longer
matches its row (cannot happen through the API layer, which pins rows) is served
unsteered and logged.

RPCs (`collective_rpc`): `unipool_set_profile(slot, bias, mask, digest)`,
`unipool_routing_stats()`, `unipool_steering_rows()`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from vllm.platforms import current_platform

if current_platform.is_cpu():
    from vllm.v1.worker.cpu_worker import CPUWorker as _PlatformWorker
else:
    from vllm.v1.worker.gpu_worker import Worker as _PlatformWorker

logger = logging.getLogger("unipool_serve.worker")
XARG_NAME, XARG_SLOT, XARG_HASH = "unipool_steering", "unipool_steering_slot", "unipool_steering_hash"


class StepSteering:
    """Computes and writes one step's per-token profile rows for a V1 model runner."""

    def __init__(self, runner, state):
        self.runner, self.state = runner, state
        self.row_hash: dict[int, str] = {}
        self.warned: set[str] = set()

    def slot_of(self, req_id: str) -> int:
        extra = self.runner.requests[req_id].sampling_params.extra_args or {}
        slot = extra.get(XARG_SLOT)
        if slot is None:
            if "steering" in extra and req_id not in self.warned:
                self.warned.add(req_id)
                logger.error("request %s asks for steering %r but the unipool_api endpoint plugin did not resolve "
                             "it (set VLLM_PLUGINS=unipool,unipool_api): served unsteered", req_id, extra["steering"])
            return 0
        if self.row_hash.get(slot) != extra.get(XARG_HASH):
            if req_id not in self.warned:
                self.warned.add(req_id)
                logger.error("request %s: steering row %s no longer holds profile %r: served unsteered",
                             req_id, slot, extra.get(XARG_NAME))
            return 0
        return int(slot)

    def write(self, num_tokens: int) -> None:
        index = self.state.index
        index[:num_tokens].zero_()  # padding and stale entries: no steering
        batch = self.runner.input_batch
        num_reqs = batch.num_reqs
        slots = np.fromiter((self.slot_of(r) for r in batch.req_ids[:num_reqs]), dtype=np.int32, count=num_reqs)
        if not slots.any():
            return
        starts = self.runner.query_start_loc.np[: num_reqs + 1]
        per_token = np.repeat(slots, np.diff(starts))  # [num_actual_tokens]
        index[: per_token.shape[0]].copy_(torch.from_numpy(per_token), non_blocking=False)


class SteeringWorker(_PlatformWorker):
    """The platform worker plus per-request steering and routing statistics."""

    def init_device(self):
        super().init_device()
        runner = self.model_runner
        if getattr(self, "use_v2_model_runner", False) or not hasattr(runner, "_model_forward"):
            raise RuntimeError(
                "unipool steering needs vLLM's V1 model runner (it hooks _model_forward); "
                f"this worker runs {type(runner).__name__}. Set VLLM_USE_V2_MODEL_RUNNER=0."
            )

    def load_model(self, *args, **kwargs):
        super().load_model(*args, **kwargs)
        runner = self.model_runner
        state = runner.get_model().steering
        step = StepSteering(runner, state)
        self._steering_step = step
        original = runner._model_forward

        def model_forward(input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None, **kw):
            num_tokens = (input_ids if input_ids is not None else inputs_embeds).shape[0]
            step.write(num_tokens)
            return original(input_ids=input_ids, positions=positions, intermediate_tensors=intermediate_tensors,
                            inputs_embeds=inputs_embeds, **kw)

        runner._model_forward = model_forward  # instance attribute: only this runner is affected

    def compile_or_warm_up_model(self, *args, **kwargs):
        result = super().compile_or_warm_up_model(*args, **kwargs)
        self._steering_state().index.zero_()
        return result

    # ---- RPCs --------------------------------------------------------------
    def _steering_state(self):
        return self.model_runner.get_model().steering

    def unipool_set_profile(self, slot: int, bias, mask, digest: str | None) -> None:
        """Write (or clear, when bias is None) one table row in place."""
        state = self._steering_state()
        if not 1 <= slot <= state.max_profiles:
            raise ValueError(f"steering slot {slot} outside 1..{state.max_profiles}")
        if bias is None:
            state.bias_table[slot].zero_()
            state.mask_table[slot].zero_()
            self._steering_step.row_hash.pop(slot, None)
            return
        state.bias_table[slot].copy_(torch.as_tensor(bias, dtype=torch.float32))
        state.mask_table[slot].copy_(torch.as_tensor(mask, dtype=torch.int8))
        self._steering_step.row_hash[slot] = digest

    def unipool_routing_stats(self):
        """Cumulative token-slots per (layer, pool expert) as nested lists, [L, E]."""
        return self._steering_state().routing_counts.cpu().tolist()

    def unipool_steering_rows(self):
        """Which rows hold which profile hash (for tests and debugging)."""
        return dict(self._steering_step.row_hash)
