"""Worker class that feeds per-request steering into the model and serves the steering RPCs.

Select it with `--worker-cls unipool_serve.model_executor.steering.worker.SteeringWorker`
(`unipool-serve` does). It subclasses the platform's own worker (CPU or CUDA) and installs
one of two hooks that fill the model's persistent per-token row index before each real
step (steering/table.py):

  V1 model runner  wraps `_model_forward`; reads each request's SamplingParams from
                   `runner.requests` by request id (verified on vLLM's CPU build).
  V2 model runner  wraps the runner's ModelState: `add_request` records each request's row
                   by request index (V2 keeps no SamplingParams per request), `prepare_inputs`
                   expands the step's rows per token. Written against vLLM 0.32's source; the
                   CPU build cannot run V2 ("Model Runner V2 requires Triton"), so this path
                   has not been executed here (docs/vllm-plugin.md).

Dummy and warm-up runs bypass both hooks and see whatever the index held: every hooked
step zeroes the slice it uses first, and the worker zeroes the index after warm-up.

A request is steered only when its reserved extra_args carry a row signed by the API
process's enforcement point and that row still holds the signed digest
(steering/contract.py); anything else runs unsteered and is logged once per request (an
exception here would stop the engine for every request).

The model exposes two attributes this worker reads: `steering` (a SteeringTable) and
`routing_counts` (a RoutingCounts). Our own model builds them; a model of one of vLLM's MoE
families gets them, and steering at its routers, from steering/family_hooks.py when it loads.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Hashable

import numpy as np
from vllm.platforms import current_platform

from . import contract
from .table import SteeringTable, expand_rows

if current_platform.is_cpu():
    from vllm.v1.worker.cpu_worker import CPUWorker as _PlatformWorker
else:
    from vllm.v1.worker.gpu_worker import Worker as _PlatformWorker

logger = logging.getLogger("unipool_serve.worker")


class RequestRows:
    """Each request's verified steering row, by whatever key a model runner tracks requests with."""

    def __init__(self, table: SteeringTable):
        self.table = table
        self.secret: bytes | None = None
        self._rows: dict[Hashable, tuple[int, str] | None] = {}
        self._warned: set[Hashable] = set()

    def _warn(self, key: Hashable, message: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.error("request %s: " + message + ": served unsteered", key, *args)

    def admit(self, key: Hashable, sampling_params) -> None:
        """Verify a request's steering fields once, when it enters the batch."""
        extra = sampling_params.extra_args if sampling_params is not None else None  # None: pooling
        try:
            self._rows[key] = contract.verified_row(extra, self.secret)
        except ValueError as exc:
            self._rows[key] = None
            self._warn(key, "%s", exc)
        if self._rows[key] is None and extra and contract.REQUEST_FIELD in extra:
            self._warn(key, "asks for steering %r, which no enforcement point resolved (run unipool-serve, "
                       "or set VLLM_PLUGINS=unipool,unipool_api)", extra[contract.REQUEST_FIELD])

    def forget(self, key: Hashable) -> None:
        self._rows.pop(key, None)
        self._warned.discard(key)

    def known(self, key: Hashable) -> bool:
        return key in self._rows

    def prune(self, live) -> None:
        """Forget the requests not in `live` (a container of keys)."""
        for key in [k for k in self._rows if k not in live]:
            self.forget(key)

    def __len__(self) -> int:
        return len(self._rows)

    def row(self, key: Hashable) -> int:
        """The table row to use this step (0 when unsteered, or when the row was rewritten since)."""
        verified = self._rows.get(key)
        if verified is None:
            return 0
        row, row_digest = verified
        if not self.table.holds(row, row_digest):
            self._warn(key, "steering row %s no longer holds profile digest %s", row, row_digest)
            return 0
        return row


class V1StepHook:
    """Fills the index before each `_model_forward` of a V1 model runner."""

    def __init__(self, runner, rows: RequestRows):
        self.runner, self.rows = runner, rows
        original = runner._model_forward

        def model_forward(input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None, **kw):
            self.write((input_ids if input_ids is not None else inputs_embeds).shape[0])
            return original(input_ids=input_ids, positions=positions, intermediate_tensors=intermediate_tensors,
                            inputs_embeds=inputs_embeds, **kw)

        runner._model_forward = model_forward  # instance attribute: only this runner is affected

    def write(self, num_tokens: int) -> None:
        batch = self.runner.input_batch
        req_ids = batch.req_ids[: batch.num_reqs]
        for req_id in req_ids:
            if not self.rows.known(req_id):
                self.rows.admit(req_id, self.runner.requests[req_id].sampling_params)
        if len(self.rows) > 2 * len(req_ids) + 64:  # forget requests that have left the engine
            self.rows.prune(self.runner.requests)
        rows = np.fromiter((self.rows.row(r) for r in req_ids), dtype=np.int32, count=len(req_ids))
        per_token = expand_rows(rows, self.runner.query_start_loc.np) if rows.any() else None
        self.rows.table.fill_index(num_tokens, per_token)


class V2StepHook:
    """Keeps rows by request index through a V2 runner's ModelState and fills the index in prepare_inputs."""

    def __init__(self, runner, rows: RequestRows):
        self.runner, self.rows = runner, rows
        state = runner.model_state
        add, remove, prepare = state.add_request, state.remove_request, state.prepare_inputs

        def add_request(req_index, new_req_data):
            self.rows.admit(req_index, new_req_data.sampling_params)
            return add(req_index, new_req_data)

        def remove_request(req_id):
            # called before req_states forgets the request, so its index is still known
            index = runner.req_states.req_id_to_index.get(req_id)
            if index is not None:
                self.rows.forget(index)
            return remove(req_id)

        def prepare_inputs(input_batch, req_states):
            indices = input_batch.idx_mapping_np[: input_batch.num_reqs]
            rows = np.fromiter((self.rows.row(int(i)) for i in indices), dtype=np.int32, count=len(indices))
            per_token = expand_rows(rows, input_batch.query_start_loc_np) if rows.any() else None
            self.rows.table.fill_index(input_batch.num_tokens_after_padding, per_token)
            return prepare(input_batch, req_states)

        state.add_request, state.remove_request, state.prepare_inputs = add_request, remove_request, prepare_inputs


class SteeringWorker(_PlatformWorker):
    """The platform worker plus per-request steering and routing statistics."""

    def load_model(self, *args, **kwargs):
        super().load_model(*args, **kwargs)
        runner = self.model_runner
        if not hasattr(runner.get_model(), "steering"):  # one of vLLM's own families
            from .family_hooks import attach

            attach(runner.get_model(), self.vllm_config)
        self._steering_rows = RequestRows(runner.get_model().steering)
        if hasattr(runner, "_model_forward"):
            V1StepHook(runner, self._steering_rows)
        elif hasattr(runner, "model_state"):
            V2StepHook(runner, self._steering_rows)
        else:
            raise RuntimeError(f"unipool steering cannot hook this vLLM model runner ({type(runner).__name__})")

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
        rows = self._steering_rows
        if rows.secret is not None and not hmac.compare_digest(rows.secret, secret):
            raise PermissionError("this engine already holds another API process's steering secret")
        rows.secret = secret

    def unipool_set_profile(self, slot: int, bias, mask, row_digest: str | None, auth: str,
                            routed_scale: float = 1.0) -> None:
        """Write (or clear, when bias is None) one table row in place; `auth` proves the caller (the
        digest it signs covers the routed budget too: steering/profile.py's content hash)."""
        secret = self._steering_rows.secret
        if secret is None or not hmac.compare_digest(auth, contract.profile_auth(secret, slot, row_digest)):
            raise PermissionError("steering rows are written only by the API process that set the secret")
        if bias is None:
            self._table().clear_row(slot)
        else:
            self._table().set_row(slot, bias, mask, row_digest, routed_scale)

    def unipool_routing_stats(self):
        """Cumulative token-slots per (layer, expert) as nested lists, [L, E]."""
        return self.model_runner.get_model().routing_counts.counts.cpu().tolist()

    def unipool_steering_rows(self):
        """Which rows hold which profile digest (for tests and debugging)."""
        return dict(self._table().digests)
