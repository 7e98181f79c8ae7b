"""vLLM endpoint plugin `unipool_api`: our routes and request layer on vLLM's own server.

`unipool-serve` turns it on by itself. Under plain vLLM it loads when
`VLLM_PLUGINS` names it, and since that variable also filters the general
plugins, name both: `VLLM_PLUGINS=unipool,unipool_api`. Settings come from the
environment (the CLI sets them from its flags):

  UNIPOOL_STEERING_DIR      folder of <name>.safetensors profiles loaded at start
  UNIPOOL_API_KEYS          comma-separated KEY or KEY=PROFILE (binds a mandatory profile)
  UNIPOOL_ADMIN_KEY         key allowed to upload and delete profiles
  UNIPOOL_METRICS_INTERVAL  seconds between routing-statistics reads (default 5)
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from .gateway import AccessPolicy, SteeringGateway

logger = logging.getLogger("unipool_serve.server")
PLUGIN_NAME = "unipool_api"
PROFILE_RPC = "unipool_set_profile"


def settings_from_env() -> tuple[AccessPolicy, Path | None, float]:
    keys = [k.strip() for k in os.environ.get("UNIPOOL_API_KEYS", "").split(",") if k.strip()]
    policy = AccessPolicy.parse(keys, os.environ.get("UNIPOOL_ADMIN_KEY"))
    directory = os.environ.get("UNIPOOL_STEERING_DIR")
    interval = float(os.environ.get("UNIPOOL_METRICS_INTERVAL", "5"))
    return policy, Path(directory) if directory else None, interval


class UniPoolEndpointPlugin:
    """Implements vLLM's EndpointPlugin protocol (attach_router, init_state)."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def __init__(self):
        self.policy, self.directory, self.interval = settings_from_env()
        self.metrics = None
        self.app_state = None

    def attach_router(self, app) -> None:
        from .steering_api import router

        app.include_router(router)
        app.state.unipool_policy = self.policy
        app.add_middleware(SteeringGateway, store_getter=self._store, policy=self.policy,
                           on_request=self._count_request, on_steering_error=self._count_error)

    def _store(self):
        return getattr(self.app_state, "unipool_store", None)

    def _count_request(self, profile: str | None) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(profile=profile or "none").inc()

    def _count_error(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.errors.labels(reason=reason).inc()

    async def init_state(self, engine_client, state, args) -> None:
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        from unipool_serve.model_executor.steering_state import max_profiles_from_env

        from .pool_metrics import PoolMetrics
        from .profile_store import ProfileStore

        self.app_state = state
        if engine_client is None:
            return
        config = engine_client.model_config.hf_config
        if getattr(config, "model_type", None) != "unipool":
            logger.warning("unipool_api: model_type is %r, not 'unipool'; steering routes disabled",
                           getattr(config, "model_type", None))
            return

        async def push(slot, profile):
            # Plain lists: tensors do not survive the engine core's re-pickling to the workers.
            bias = None if profile is None else profile.bias_rows().tolist()
            mask = None if profile is None else profile.mask_rows().tolist()
            digest = None if profile is None else profile.content_hash()[:16]
            await engine_client.collective_rpc(PROFILE_RPC, args=(slot, bias, mask, digest))

        store = ProfileStore(config, max_profiles_from_env(), self.directory, push)
        await store.load_directory()
        layer_to_pool = [config.layer_to_pool(l) for l in range(config.num_hidden_layers)]
        self.metrics = PoolMetrics(get_prometheus_registry(), layer_to_pool, config.num_experts, self.interval)
        await self.metrics.refresh(engine_client)  # baseline: warm-up runs are not served tokens
        state.unipool_metrics_task = asyncio.get_running_loop().create_task(self.metrics.poll_forever(engine_client))
        state.unipool_store = store  # last: /ready turns 200 from here on
        logger.info("unipool_api: %d steering profile(s) loaded: %s", len(store.names()), store.names())
        for name, error in store.load_errors.items():
            logger.error("unipool_api: profile file %s rejected: %s", name, error)


def make_plugin() -> UniPoolEndpointPlugin:
    return UniPoolEndpointPlugin()
