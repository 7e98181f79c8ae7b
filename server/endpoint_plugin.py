"""vLLM endpoint plugin `unipool_api`: our routes, the gateway and the enforcement point on vLLM's own server.

`unipool-serve` turns it on by itself. Under plain vLLM it loads when `VLLM_PLUGINS` names
it, and since that variable also filters the general plugins, name both:
`VLLM_PLUGINS=unipool,unipool_api`. Its settings are model_executor/settings.py's
ServerSettings (unipool-serve writes them from its flags).

  attach_router  our routes (steering profiles, /ready) and the gateway middleware
  init_state     the engine-side secret, the profile store, the enforcement point wrapped
                 around the engine client, the pool metrics; /ready turns 200 at the end
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from unipool_serve.model_executor.settings import ServerSettings, setting
from unipool_serve.model_executor.steering import contract

from .gateway import SteeringGateway
from .policy import AccessPolicy

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

    def attach_router(self, app) -> None:
        from .steering_api import router

        app.include_router(router)
        app.state.unipool_policy = self.policy
        app.state.unipool_settings = self.settings
        app.add_middleware(SteeringGateway, router=app.router, policy=self.policy,
                           on_steering_error=self._count_error, on_metrics_scrape=self._refresh_metrics)

    def _count_request(self, profile: str | None) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(profile=profile or "none").inc()

    def _count_error(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.errors.labels(reason=reason).inc()

    async def _refresh_metrics(self) -> None:
        """Before a scrape: read the engine's routing counts, so the scrape covers every computed token."""
        if self.metrics is None or self.engine_client is None:
            return
        try:
            await asyncio.wait_for(self.metrics.refresh(self.engine_client), SCRAPE_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - a scrape still answers, with the last counts
            logger.warning("routing statistics not refreshed for this scrape: %r", exc)

    async def init_state(self, engine_client, state, args) -> None:
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        from .enforcement import SteeringEnforcer
        from .pool_metrics import PoolMetrics
        from .profile_store import ProfileStore

        if engine_client is None:
            return
        config = engine_client.model_config.hf_config
        secret = secrets.token_bytes(32)
        await engine_client.collective_rpc(contract.RPC_SET_SECRET, args=(secret.hex(),))

        async def push(slot, profile):
            await engine_client.collective_rpc(contract.RPC_SET_PROFILE,
                                               args=contract.set_profile_args(secret, slot, profile))

        store = ProfileStore(config, setting("UNIPOOL_MAX_STEERING_PROFILES"), self.settings.steering_dir, push,
                             is_live=lambda request_id: request_id in engine_client.output_processor.request_states)
        await store.load_directory()
        missing = sorted(self.policy.bound_profiles() - set(store.names()))
        if missing:
            raise RuntimeError(f"unipool_api: API keys are bound to steering profile(s) {missing}, which are not "
                               f"loaded from {self.settings.steering_dir}: refusing to serve them unsteered")
        SteeringEnforcer(store, secret, on_admit=self._count_request, on_refuse=self._count_error).install(
            engine_client.engine_core)
        layer_to_pool = [config.layer_to_pool(l) for l in range(config.num_hidden_layers)]
        self.metrics = PoolMetrics(get_prometheus_registry(), layer_to_pool, config.num_experts,
                                   self.settings.metrics_interval)
        await self.metrics.refresh(engine_client)  # baseline: warm-up runs are not served tokens
        state.unipool_metrics_task = asyncio.get_running_loop().create_task(self.metrics.poll_forever(engine_client))
        self.engine_client = engine_client
        state.unipool_store = store  # last: /ready turns 200 from here on
        logger.info("unipool_api: %d steering profile(s) loaded: %s", len(store.names()), store.names())
        for name, error in store.load_errors.items():
            logger.error("unipool_api: profile file %s rejected: %s", name, error)


def make_plugin() -> UniPoolEndpointPlugin:
    return UniPoolEndpointPlugin()
