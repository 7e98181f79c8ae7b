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
after warm-up. The warm-up runs each dummy step every way a step can run (budgeted, steered,
idle), so that every compiled variant of the model exists before it serves (idle_steps.py).

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
import functools
import hmac
import logging
from collections.abc import Hashable

import numpy as np
from vllm.distributed import get_pp_group
from vllm.platforms import current_platform

from ..routing_capture import CapturedRequests, RoutingCapture
from ..settings import setting
from . import contract
from .probing import ProbedRequests, ProbeRows, collect_probed
from .request_rows import RequestRows
from .table import SteeringTable

if current_platform.is_cpu():
    from vllm.v1.worker.cpu_worker import CPUWorker as _PlatformWorker
else:
    from vllm.v1.worker.gpu_worker import Worker as _PlatformWorker

logger = logging.getLogger("unipool_serve.worker")


class V1StepHook:
    """Fills the index before each `_model_forward` of a V1 model runner."""

    def __init__(self, runner, rows: RequestRows, capture: RoutingCapture | None = None):
        self.runner, self.rows, self.capture = runner, rows, capture
        original = runner._model_forward

        def model_forward(input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None, **kw):
            self.write((input_ids if input_ids is not None else inputs_embeds).shape[0], positions)
            out = original(input_ids=input_ids, positions=positions, intermediate_tensors=intermediate_tensors,
                           inputs_embeds=inputs_embeds, **kw)
            self.collect(positions)
            return out

        runner._model_forward = model_forward  # instance attribute: only this runner is affected

    def write(self, num_tokens: int, positions=None) -> None:
        batch = self.runner.input_batch
        req_ids = batch.req_ids[: batch.num_reqs]
        for req_id in req_ids:
            if not self.rows.known(req_id):
                request = self.runner.requests[req_id]
                self.rows.admit(req_id, request.sampling_params, len(getattr(request, "prompt_token_ids", None) or ()))
        if len(self.rows) > 2 * len(req_ids) + 64:  # forget requests that have left the engine
            self.rows.prune(self.runner.requests)
        if self.rows.plain(req_ids):  # the common step: nobody steered, captured or probed
            self.rows.table.fill_index(num_tokens, None)
            if self.capture is not None:
                self.capture.step_records = False
            return
        gated = positions is not None and any(self.rows.gate_from(r) is not None for r in req_ids)
        token_positions = positions[:num_tokens].cpu().numpy() if gated else None
        self.rows.table.fill_index(num_tokens, *self.rows.per_token(req_ids, self.runner.query_start_loc.np,
                                                                    token_positions))
        if self.capture is not None:  # layers copy their routing out only in a step that someone wants it of
            self.capture.step_records = self.rows.records(req_ids)

    def collect(self, positions) -> None:
        """After the forward: the capturing and probed requests' routing of this step, by token position."""
        captured, probed = self.rows.captured, self.rows.probed
        if positions is None or self.capture is None or not self.capture.step_records:
            return
        batch, starts = self.runner.input_batch, self.runner.query_start_loc.np
        req_ids = batch.req_ids[: batch.num_reqs]
        spans = [(r, int(starts[i]), int(starts[i + 1])) for i, r in enumerate(req_ids)]
        if captured is not None and (capturing := [s for s in spans if captured.wants(s[0])]):
            captured.collect(capturing, positions)
        if probed is not None and (probing := [s for s in spans if probed.wants(s[0])]):
            collect_probed(probed, probing, positions)


class V2StepHook:
    """Keeps rows by request index through a V2 runner's ModelState and fills the index in prepare_inputs."""

    def __init__(self, runner, rows: RequestRows):
        self.runner, self.rows = runner, rows
        state = runner.model_state
        add, remove, prepare = state.add_request, state.remove_request, state.prepare_inputs

        def add_request(req_index, new_req_data):
            self.rows.admit(req_index, new_req_data.sampling_params,
                            len(getattr(new_req_data, "prompt_token_ids", None) or ()))
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


def keep_variants_choosable(vllm_config) -> str | None:
    """Make vLLM's CUDA graphs leave the per-step choice of a compiled variant (idle_steps.py) alive: a full
    (or breakable) CUDA graph replays one whole forward, Python included, so every step would run the
    variant its capture ran; piecewise graphs are captured inside each variant's compiled graph, below the
    choice. vLLM's V2 model runner captures by calling the model itself, outside the warm-up that runs every
    variant, so it gets none (FULL would fail at the first step of a variant it never captured). Returns the
    change made ("FULL_AND_PIECEWISE -> PIECEWISE"), or None."""
    from vllm.compilation.breakable_cudagraph import is_breakable_cudagraph_enabled
    from vllm.config.compilation import CUDAGraphMode

    compilation_config = vllm_config.compilation_config
    mode = compilation_config.cudagraph_mode
    if mode is None or mode == CUDAGraphMode.NONE:
        return None
    if is_breakable_cudagraph_enabled() or getattr(vllm_config, "use_v2_model_runner", False):
        allowed = CUDAGraphMode.NONE
    elif mode.has_full_cudagraphs():
        allowed = CUDAGraphMode.PIECEWISE if mode.has_piecewise_cudagraphs() else CUDAGraphMode.NONE
    else:
        return None
    compilation_config.cudagraph_mode = allowed
    return f"{mode.name} -> {allowed.name}"


class SteeringWorker(_PlatformWorker):
    """The platform worker plus per-request steering and routing statistics."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # the model runner, which reads the CUDA graph mode, comes later
        if setting("UNIPOOL_STEERING") or setting("UNIPOOL_ROUTING_CAPTURE"):  # the model will have variants
            if change := keep_variants_choosable(self.vllm_config):
                logger.warning("CUDA graph mode %s: a full CUDA graph would freeze which compiled variant a step "
                               "runs (UNIPOOL_STEERING=0 and UNIPOOL_ROUTING_CAPTURE=0 keep vLLM's mode)", change)

    def load_model(self, *args, **kwargs):
        super().load_model(*args, **kwargs)
        runner = self.model_runner
        model = runner.get_model()
        if not hasattr(model, "steering"):  # one of vLLM's own families
            from .family_hooks import attach

            attach(model, self.vllm_config)
        capture = getattr(model, "routing_capture", None)
        captures = capture is not None and capture.enabled
        captured = CapturedRequests(capture, capture.num_experts) if captures else None
        self._probe_rows = ProbeRows(len(capture.layers), capture.num_experts,
                                     setting("UNIPOOL_MAX_PROBES")) if captures else None
        probed = ProbedRequests(self._probe_rows, capture) if captures else None
        self._steering_rows = RequestRows(model.steering, captured, probed)
        if hasattr(runner, "_model_forward"):
            V1StepHook(runner, self._steering_rows, capture)
        elif hasattr(runner, "model_state"):
            V2StepHook(runner, self._steering_rows)
        else:
            raise RuntimeError(f"unipool steering cannot hook this vLLM model runner ({type(runner).__name__})")

    def determine_available_memory(self, *args, **kwargs):
        with self._warm_up_every_variant():  # the CPU worker compiles (warms up) the model here
            return super().determine_available_memory(*args, **kwargs)

    @contextlib.contextmanager
    def _warm_up_every_variant(self):
        """Every dummy run of the warm-up runs every way a step can (IdleSteps.warm_up), so that a model
        with variants (steering/idle_steps.py) has each compiled (and, where vLLM captures piecewise CUDA graphs,
        captured) before it serves; otherwise the first steered request would wait for a compilation."""
        runner = self.model_runner
        idle_steps = getattr(runner.get_model(), "idle_steps", None)
        if idle_steps is None or idle_steps.variant is None:
            yield
            return
        dummy_run = runner._dummy_run
        runner._dummy_run = functools.partial(idle_steps.warm_up, dummy_run)  # instance attribute over the method
        try:
            yield
        finally:
            del runner._dummy_run

    def compile_or_warm_up_model(self, *args, **kwargs):
        with self._warm_up_every_variant():
            result = super().compile_or_warm_up_model(*args, **kwargs)
        self._table().clear_index()  # the warm-up ran outside the hooks
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

    def unipool_set_probe(self, slot: int, rows: dict | None, row_digest: str | None, auth: str) -> None:
        """Write (or clear, when rows is None) one probe row; `auth` proves the caller."""
        secret = self._steering_rows.secret
        if secret is None or not hmac.compare_digest(auth, contract.profile_auth(secret, slot, row_digest, "probe")):
            raise PermissionError("probe rows are written only by the API process that set the secret")
        if self._probe_rows is None:
            raise RuntimeError("this engine does not capture routing, so it cannot run probes")
        if rows is None:
            self._probe_rows.clear_row(slot)
        else:
            self._probe_rows.set_row(slot, rows, row_digest)

    def unipool_routing_stats(self):
        """Cumulative token-slots per (layer, expert) as nested lists, [L, E]."""
        return self.model_runner.get_model().routing_counts.counts.cpu().tolist()

    def unipool_capture_layers(self):
        """The decoder layer of each row of a routing capture, or None when this engine cannot capture (no
        buffers, or the V2 runner, whose hook copies nothing out: capture and probes are then refused)."""
        capture = getattr(self.model_runner.get_model(), "routing_capture", None)
        v1 = hasattr(self.model_runner, "_model_forward")
        return list(capture.layers) if capture is not None and capture.enabled and v1 else None

    def unipool_take_capture(self, request_ids: list[str]):
        """{request id: {"experts": .npy bytes or None, "logits": .npy bytes or None, "probes": {row: scores}
        or None}} of finished requests, forgotten afterwards."""
        rows = self._steering_rows
        captured = {} if rows.captured is None else rows.captured.take(list(request_ids))
        taken = {}
        for request_id in request_ids:
            experts, logits = captured.get(request_id, (None, None))
            probes = None if rows.probed is None else rows.probed.take(request_id)
            if experts is not None or logits is not None or probes is not None:
                taken[request_id] = {"experts": experts, "logits": logits, "probes": probes}
        return taken

    def unipool_steering_rows(self):
        """Which rows hold which profile digest (for tests and debugging)."""
        return dict(self._table().digests)
