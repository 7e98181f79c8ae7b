"""vLLM endpoint plugin `unipool_api`: our routes, the gateway and the enforcement point on vLLM's own server.

`unipool-serve` turns it on by itself. Under plain vLLM it loads when `VLLM_PLUGINS` names
it, and since that variable also filters the general plugins, name both:
`VLLM_PLUGINS=unipool,unipool_api`. Its settings are model_executor/settings.py's
ServerSettings (unipool-serve writes them from its flags).

  attach_router  our routes (steering profiles, /ready, the steering console unless --no-console)
                 and the gateway middleware
  init_state     the engine-side secret, the profile store, the enforcement point wrapped
                 around the engine client, the pool metrics, the shutdown hook; routes that
                 cannot serve this model are unmounted; /ready turns 200 at the end

Not mounting a vLLM route means removing it from the app after vLLM registered it: the
endpoint plugin runs after the core routers (`unmount`).

Shutdown: server/shutdown.py's DrainingShutdown wraps vLLM's engine shutdown (drain first).
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from unipool_serve.model_executor.settings import ServerSettings, setting
from unipool_serve.model_executor.steering import contract
from unipool_serve.model_executor.steering.shape import SteerableModel

from .app_state import ServerState, attach_state, server_state
from .gateway import APIGateway
from .policy import AccessPolicy
from .shutdown import DrainingShutdown

logger = logging.getLogger("unipool_serve.server")
PLUGIN_NAME = "unipool_api"
SCRAPE_TIMEOUT_S = 5.0


class UniPoolEndpointPlugin:
    """Implements vLLM's EndpointPlugin protocol (attach_router, init_state)."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def __init__(self):
        self.settings = ServerSettings.from_env()
        self.policy = AccessPolicy.parse(self.settings.api_keys, self.settings.admin_key)
        self.metrics = None
        self.engine_client = None
        self.capture_layers: list[int] | None = None  # decoder layer of each captured row (None: no capture)
        self.app = None
        self.shutdown: DrainingShutdown | None = None  # wraps vLLM's engine shutdown once serving

    def attach_router(self, app) -> None:
        from .steering_api import router

        self.app = app
        app.include_router(router)  # profiles, probes, /ready
        if self.settings.console:
            from .console import router as console_router

            app.include_router(console_router)  # the steering console: a page and its assets, no data
        attach_state(app, ServerState(self.policy, self.settings, self.unavailable))
        app.add_middleware(APIGateway, router=app.router, policy=self.policy,
                           on_steering_error=self._count_error, on_metrics_scrape=self._refresh_metrics,
                           unavailable=self.unavailable, take_capture=self._take_capture,
                           body_timeout=self.settings.body_timeout, on_probe_scores=self._record_probe)

    def unavailable(self) -> str | None:
        """Why new requests cannot be served right now (None: they can)."""
        if self.shutdown is not None and self.shutdown.draining:
            return "the server is shutting down; retry on another replica"
        if self.engine_client is not None and self.engine_client.errored:
            return "the engine has stopped; this server cannot serve requests"
        return None

    async def _take_capture(self, engine_ids: list[str]) -> tuple[dict, list[int]]:
        """The captured routing of finished requests, from the first worker (TP ranks route alike), and the
        decoder layer of each of its rows."""
        results = await self.engine_client.collective_rpc(contract.RPC_TAKE_CAPTURE, args=(engine_ids,))
        return (results[0] if results else {}), list(self.capture_layers or ())

    def _count_request(self, profile: str | None) -> None:
        if self.metrics is not None:
            self.metrics.count_request(profile)

    def _record_probe(self, name: str, scores: dict) -> None:
        if self.metrics is not None:
            self.metrics.record_probe(name, scores)

    def _count_error(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.errors.labels(reason=reason).inc()

    async def _refresh_metrics(self) -> None:
        """Before a scrape: read the engine's routing counts, so the scrape covers every computed token, and
        free finished rows, so the rows gauge is current."""
        if self.metrics is None or self.engine_client is None or self.unavailable() is not None:
            return
        try:
            await asyncio.wait_for(server_state(self.app).store.release_finished(), SCRAPE_TIMEOUT_S)
            await asyncio.wait_for(self.metrics.refresh(self.engine_client), SCRAPE_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - a scrape still answers, with the last counts
            logger.warning("routing statistics not refreshed for this scrape: %r", exc)

    async def _every_interval(self, engine_client, stores) -> None:
        """Background upkeep: free the rows of deleted profiles and probes whose requests have ended, and
        read the routing counts for the per-interval gauges."""
        while True:
            try:
                for store in stores:
                    await store.release_finished()
                self.metrics.update_gauges(await self.metrics.refresh(engine_client))
            except Exception:  # noqa: BLE001 - upkeep must never take the server down
                logger.exception("background upkeep (profile rows, routing statistics) failed")
            await asyncio.sleep(self.settings.metrics_interval)

    async def init_state(self, engine_client, state, args) -> None:
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        from .enforcement import SteeringEnforcer
        from .pool_metrics import PoolMetrics

        if engine_client is None:
            return
        # UniPool or one of vLLM's MoE families (ValueError naming the supported ones otherwise)
        model = SteerableModel.of(engine_client.model_config.hf_config)
        secret = secrets.token_bytes(32)
        await engine_client.collective_rpc(contract.RPC_SET_SECRET, args=(secret.hex(),))
        self.capture_layers = (await engine_client.collective_rpc(contract.RPC_CAPTURE_LAYERS))[0]
        capture_refused = self._capture_refusal(engine_client)
        store, probes = await self._load_stores(engine_client, model, secret, capture_refused)
        SteeringEnforcer(store, secret, on_admit=self._count_request, on_refuse=self._count_error,
                         max_capture_bytes=self.settings.max_capture_bytes, capture_refused=capture_refused,
                         capture_rows=len(self.capture_layers or ()), probes=probes).install(engine_client)
        self.metrics = PoolMetrics(get_prometheus_registry(), list(model.layer_to_pool), model.num_experts,
                                   self.settings.metrics_interval, setting("UNIPOOL_METRICS_MAX_EXPERT_SERIES"),
                                   rows_in_use=store.rows_in_use)
        await self.metrics.refresh(engine_client)  # baseline: warm-up runs are not served tokens
        loop = asyncio.get_running_loop()
        every_interval = loop.create_task(self._every_interval(engine_client, (store, probes)))
        self.shutdown = DrainingShutdown(engine_client, loop, every_interval)
        if getattr(state, "serving_structured_decisions", "absent") is None:
            unmount(self.app, "/v1/systemone")  # vLLM answers 501 to every call for models it cannot read
        self.engine_client = engine_client
        ours = server_state(self.app)
        ours.engine_client, ours.probes, ours.store = engine_client, probes, store  # store last: /ready turns 200
        for loaded in (store, probes):
            logger.info("unipool_api: %d %s(s) loaded: %s", len(loaded.names()), loaded.what, loaded.names())
            for name, error in loaded.load_errors.items():
                logger.error("unipool_api: %s file %s rejected: %s", loaded.what, name, error)

    def _capture_refusal(self, engine_client) -> str | None:
        """Why this engine cannot capture routing (and so cannot run probes); None: it can."""
        if engine_client.vllm_config.parallel_config.pipeline_parallel_size > 1:
            return "routing capture is not served with pipeline parallelism (each stage sees its own layers)"
        if not setting("UNIPOOL_ROUTING_CAPTURE"):
            return "routing capture is off on this server (UNIPOOL_ROUTING_CAPTURE=0)"
        if self.capture_layers is None:
            return ("routing capture is not available for this model: vLLM runs its MoE layers with a kernel that "
                    "never hands the routing out (see the server log)")
        return None

    async def _load_stores(self, engine_client, model, secret: bytes, capture_refused: str | None):
        """The profile store and the probe store, loaded from their folders and pushed to the engine;
        RuntimeError when a key is bound to something that did not load."""
        from .profile_store import ProbeStore, ProfileStore

        def is_live(request_id: str) -> bool:
            return request_id in engine_client.output_processor.request_states

        def pusher(rpc: str, args_of):
            async def push(slot, item):
                await engine_client.collective_rpc(rpc, args=args_of(secret, slot, item))
            return push

        store = ProfileStore(model, setting("UNIPOOL_MAX_STEERING_PROFILES"), self.settings.steering_dir,
                             pusher(contract.RPC_SET_PROFILE, contract.set_profile_args), is_live)
        probes = ProbeStore(model, setting("UNIPOOL_MAX_PROBES"),
                            self.settings.probe_dir if capture_refused is None else None,
                            pusher(contract.RPC_SET_PROBE, contract.set_probe_args), is_live,
                            unavailable=capture_refused)
        for loaded, bound, folder in ((store, self.policy.bound_profiles(), self.settings.steering_dir),
                                      (probes, self.policy.bound_probes(), self.settings.probe_dir)):
            await loaded.load_directory()
            missing = sorted(bound - set(loaded.names()))
            if missing:
                why = f" ({capture_refused})" if loaded is probes and capture_refused else ""
                raise RuntimeError(f"unipool_api: API keys are bound to {loaded.what}(s) {missing}, which are not "
                                   f"loaded from {folder}{why}: refusing to serve those keys without them")
        return store, probes


def unmount(app, path: str) -> None:
    """Remove every route of `path` from the app (and from its OpenAPI schema)."""
    if app is None:
        return
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != path]
    app.openapi_schema = None
    logger.info("unipool_api: %s unmounted (it cannot serve this model)", path)

