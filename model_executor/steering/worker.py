"""Worker class that feeds per-request steering into the model and serves the steering RPCs.

Select it with `--worker-cls unipool_serve.model_executor.steering.worker.SteeringWorker`
(`unipool-serve` does). It subclasses the platform's own worker (CPU or CUDA) and hooks
the V1 model runner's `_model_forward`: before each real step `StepSteering` writes each
token's table row into the model's persistent index (steering/table.py). Dummy and
warm-up runs call the model directly and bypass the hook, so every hooked step zeroes the
slice it uses first, and the worker zeroes the index once after warm-up.

A request is steered only when its reserved extra_args carry a row signed by the API
process's enforcement point and that row still holds the signed digest
(steering/contract.py); anything else runs unsteered and is logged once per request (an
exception here would stop the engine for every request).

The model exposes two attributes this worker reads: `steering` (a SteeringTable) and
`routing_counts` (a RoutingCounts).
"""

from __future__ import annotations

import hmac
import logging

import numpy as np
from vllm.platforms import current_platform

from . import contract
from .table import SteeringTable, expand_rows

if current_platform.is_cpu():
    from vllm.v1.worker.cpu_worker import CPUWorker as _PlatformWorker
else:
    from vllm.v1.worker.gpu_worker import Worker as _PlatformWorker

logger = logging.getLogger("unipool_serve.worker")


class StepSteering:
    """Computes and writes one step's per-token table rows for a V1 model runner."""

    def __init__(self, runner, table: SteeringTable):
        self.runner, self.table = runner, table
        self.secret: bytes | None = None
        self._rows: dict[str, tuple[int, str] | None] = {}  # request id -> verified (row, digest)
        self._warned: set[str] = set()

    def _warn(self, req_id: str, message: str, *args) -> None:
        if req_id not in self._warned:
            self._warned.add(req_id)
            logger.error("request %s: " + message + ": served unsteered", req_id, *args)

    def row_of(self, req_id: str) -> int:
        if req_id not in self._rows:
            params = self.runner.requests[req_id].sampling_params  # None for pooling requests
            extra = params.extra_args if params is not None else None
            try:
                self._rows[req_id] = contract.verified_row(extra, self.secret)
            except ValueError as exc:
                self._rows[req_id] = None
                self._warn(req_id, "%s", exc)
            if self._rows[req_id] is None and extra and contract.REQUEST_FIELD in extra:
                self._warn(req_id, "asks for steering %r, which no enforcement point resolved (run unipool-serve, "
                           "or set VLLM_PLUGINS=unipool,unipool_api)", extra[contract.REQUEST_FIELD])
        verified = self._rows[req_id]
        if verified is None:
            return 0
        row, row_digest = verified
        if not self.table.holds(row, row_digest):
            self._warn(req_id, "steering row %s no longer holds profile digest %s", row, row_digest)
            return 0
        return row

    def write(self, num_tokens: int) -> None:
        batch = self.runner.input_batch
        req_ids = batch.req_ids[: batch.num_reqs]
        if len(self._rows) > 2 * len(req_ids) + 64:  # forget requests that have left the batch
            live = set(self.runner.requests)
            self._rows = {r: v for r, v in self._rows.items() if r in live}
            self._warned &= live
        rows = np.fromiter((self.row_of(r) for r in req_ids), dtype=np.int32, count=len(req_ids))
        per_token = expand_rows(rows, self.runner.query_start_loc.np) if rows.any() else None
        self.table.fill_index(num_tokens, per_token)


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
        step = StepSteering(runner, runner.get_model().steering)
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
        self._table().index.zero_()
        return result

    # ---- RPCs (steering/contract.py) -----------------------------------------
    def _table(self) -> SteeringTable:
        return self.model_runner.get_model().steering

    def unipool_set_secret(self, secret_hex: str) -> None:
        """Accept the API process's secret once; a different one later is refused."""
        secret = bytes.fromhex(secret_hex)
        step = self._steering_step
        if step.secret is not None and not hmac.compare_digest(step.secret, secret):
            raise PermissionError("this engine already holds another API process's steering secret")
        step.secret = secret

    def unipool_set_profile(self, slot: int, bias, mask, row_digest: str | None, auth: str) -> None:
        """Write (or clear, when bias is None) one table row in place; `auth` proves the caller."""
        secret = self._steering_step.secret
        if secret is None or not hmac.compare_digest(auth, contract.profile_auth(secret, slot, row_digest)):
            raise PermissionError("steering rows are written only by the API process that set the secret")
        if bias is None:
            self._table().clear_row(slot)
        else:
            self._table().set_row(slot, bias, mask, row_digest)

    def unipool_routing_stats(self):
        """Cumulative token-slots per (layer, expert) as nested lists, [L, E]."""
        return self.model_runner.get_model().routing_counts.counts.cpu().tolist()

    def unipool_steering_rows(self):
        """Which rows hold which profile digest (for tests and debugging)."""
        return dict(self._table().digests)
