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
step that reads the tables zeroes the slice it uses first, and the worker zeroes the index
after warm-up. The warm-up runs each dummy step twice, as a steered and as an idle step, so
that both compiled variants of our own model exist before it serves (vllm_model.py).

A request is steered only when its reserved extra_args carry a row signed by the API
process's enforcement point and that row still holds the signed digest
(steering/contract.py); anything else runs unsteered and is logged once per request (an
exception here would stop the engine for every request).

The model exposes the attributes this worker reads: `steering` (a SteeringTable),
`routing_counts` (a RoutingCounts) and, for per-request routing capture,
`routing_capture` (a RoutingCapture; the V1 hook copies the capturing requests' rows out
after each forward, model_executor/routing_capture.py; the V2 hook does not capture). Our
own model builds them; a model of one of vLLM's MoE families gets all three, and steering at
its routers, from steering/family_hooks.py when it loads.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import Hashable

import numpy as np
from vllm.distributed import get_pp_group
from vllm.platforms import current_platform

from ..routing_capture import CapturedRequests
from . import contract
from .table import SteeringTable, expand_rows

if current_platform.is_cpu():
    from vllm.v1.worker.cpu_worker import CPUWorker as _PlatformWorker
else:
    from vllm.v1.worker.gpu_worker import Worker as _PlatformWorker

logger = logging.getLogger("unipool_serve.worker")


class RequestRows:
    """Each request's verified steering (row and budget), by whatever key a model runner tracks
    requests with."""

    def __init__(self, table: SteeringTable, captured: CapturedRequests | None = None):
        self.table, self.captured = table, captured
        self.secret: bytes | None = None
        self._rows: dict[Hashable, contract.Steering | None] = {}
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
        verified = self._rows[key]
        if verified is not None and verified.capture and self.captured is not None:
            self.captured.admit(key, verified.capture, getattr(sampling_params, "routed_experts_prompt_start", 0))
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
        if self.captured is not None:
            self.captured.prune(live)

    def __len__(self) -> int:
        return len(self._rows)

    def steering(self, key: Hashable) -> contract.Steering:
        """What this request runs under this step (unsteered when its row was rewritten since)."""
        verified = self._rows.get(key)
        if verified is None:
            return contract.NO_ROW
        if not self.table.holds(verified.row, verified.digest):
            self._warn(key, "steering row %s no longer holds profile digest %s", verified.row, verified.digest)
            return contract.NO_ROW
        return verified

    def per_token(self, keys, query_start_loc) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(rows, budgets) of each token of the step, or None for what no request of it uses."""
        steering = [self.steering(k) for k in keys]
        rows = np.fromiter((s.row for s in steering), dtype=np.int32, count=len(steering))
        budgets = np.fromiter((self.table.top_k if s.top_k is None else s.top_k for s in steering),
                              dtype=np.int32, count=len(steering))
        return (expand_rows(rows, query_start_loc) if rows.any() else None,
                expand_rows(budgets, query_start_loc) if (budgets != self.table.top_k).any() else None)


class V1StepHook:
    """Fills the index before each `_model_forward` of a V1 model runner."""

    def __init__(self, runner, rows: RequestRows):
        self.runner, self.rows = runner, rows
        original = runner._model_forward

        def model_forward(input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None, **kw):
            self.write((input_ids if input_ids is not None else inputs_embeds).shape[0])
            out = original(input_ids=input_ids, positions=positions, intermediate_tensors=intermediate_tensors,
                           inputs_embeds=inputs_embeds, **kw)
            self.collect(positions)
            return out

        runner._model_forward = model_forward  # instance attribute: only this runner is affected

    def write(self, num_tokens: int) -> None:
        batch = self.runner.input_batch
        req_ids = batch.req_ids[: batch.num_reqs]
        for req_id in req_ids:
            if not self.rows.known(req_id):
                self.rows.admit(req_id, self.runner.requests[req_id].sampling_params)
        if len(self.rows) > 2 * len(req_ids) + 64:  # forget requests that have left the engine
            self.rows.prune(self.runner.requests)
        self.rows.table.fill_index(num_tokens, *self.rows.per_token(req_ids, self.runner.query_start_loc.np))

    def collect(self, positions) -> None:
        """After the forward: the capturing requests' rows of this step, by token position."""
        captured = self.rows.captured
        if captured is None or positions is None:
            return
        batch, starts = self.runner.input_batch, self.runner.query_start_loc.np
        spans = [(r, int(starts[i]), int(starts[i + 1])) for i, r in enumerate(batch.req_ids[: batch.num_reqs])
                 if captured.wants(r)]
        if spans:
            captured.collect(spans, positions)


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
            indices = [int(i) for i in input_batch.idx_mapping_np[: input_batch.num_reqs]]
            self.rows.table.fill_index(input_batch.num_tokens_after_padding,
                                       *self.rows.per_token(indices, input_batch.query_start_loc_np))
            return prepare(input_batch, req_states)

        state.add_request, state.remove_request, state.prepare_inputs = add_request, remove_request, prepare_inputs


class SteeringWorker(_PlatformWorker):
    """The platform worker plus per-request steering and routing statistics."""

    def load_model(self, *args, **kwargs):
        super().load_model(*args, **kwargs)
        runner = self.model_runner
        model = runner.get_model()
        if not hasattr(model, "steering"):  # one of vLLM's own families
            from .family_hooks import attach

            attach(model, self.vllm_config)
        capture = getattr(model, "routing_capture", None)
        captured = CapturedRequests(capture, capture.logits.shape[-1]) if capture is not None and capture.enabled \
            else None
        self._steering_rows = RequestRows(model.steering, captured)
        if hasattr(runner, "_model_forward"):
            V1StepHook(runner, self._steering_rows)
        elif hasattr(runner, "model_state"):
            V2StepHook(runner, self._steering_rows)
        else:
            raise RuntimeError(f"unipool steering cannot hook this vLLM model runner ({type(runner).__name__})")

    def determine_available_memory(self, *args, **kwargs):
        with self._warm_up_both_variants():  # the CPU worker compiles (warms up) the model here
            return super().determine_available_memory(*args, **kwargs)

    @contextlib.contextmanager
    def _warm_up_both_variants(self):
        """Every dummy run of the warm-up runs twice: once as a steered step, once as an idle one, so
        that a model with an unsteered variant (steering/idle_steps.py) has both compiled
        (and, where vLLM captures CUDA graphs, captured) before it serves; otherwise the first steered
        request would wait for a compilation."""
        runner, table = self.model_runner, self._table()
        idle_steps = getattr(runner.get_model(), "idle_steps", None)
        if idle_steps is None or idle_steps.variant is None:
            yield
            return
        dummy_run = runner._dummy_run

        def both_variants(*args, **kwargs):
            table.step_reads = True
            try:
                dummy_run(*args, **kwargs)
            finally:
                table.step_reads = False
            return dummy_run(*args, **kwargs)

        runner._dummy_run = both_variants  # instance attribute over the class's method
        try:
            yield
        finally:
            del runner._dummy_run

    def compile_or_warm_up_model(self, *args, **kwargs):
        with self._warm_up_both_variants():
            result = super().compile_or_warm_up_model(*args, **kwargs)
        self._table().index.zero_()
        runner = self.model_runner
        # vLLM's CPU worker skips the dummy run when eager with an explicit KV-cache size, and
        # the dummy run is what allocates a later pipeline stage's receive buffers: without
        # them the first real step of that stage fails. Allocate them as the dummy run would.
        if getattr(runner, "intermediate_tensors", False) is None and not get_pp_group().is_first_rank:
            runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
                batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device)
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

    def unipool_set_profile(self, slot: int, rows: dict | None, row_digest: str | None, auth: str) -> None:
        """Write (or clear, when rows is None) one table row in place; `auth` proves the caller."""
        secret = self._steering_rows.secret
        if secret is None or not hmac.compare_digest(auth, contract.profile_auth(secret, slot, row_digest)):
            raise PermissionError("steering rows are written only by the API process that set the secret")
        if rows is None:
            self._table().clear_row(slot)
        else:
            self._table().set_row(slot, rows, row_digest)

    def unipool_routing_stats(self):
        """Cumulative token-slots per (layer, expert) as nested lists, [L, E]."""
        return self.model_runner.get_model().routing_counts.counts.cpu().tolist()

    def unipool_capture_layers(self):
        """The decoder layer of each row of a routing capture, or None when this engine cannot capture."""
        capture = getattr(self.model_runner.get_model(), "routing_capture", None)
        return list(capture.layers) if capture is not None and capture.enabled else None

    def unipool_take_capture(self, request_ids: list[str]):
        """{request id: (experts .npy bytes or None, logits .npy bytes or None)}, forgotten afterwards."""
        captured = self._steering_rows.captured
        return {} if captured is None else captured.take(list(request_ids))

    def unipool_steering_rows(self):
        """Which rows hold which profile digest (for tests and debugging)."""
        return dict(self._table().digests)
