"""Prometheus metrics of the expert pools and of steering.

Routing counts are accumulated on the device inside the model (per layer and pool
expert, over the tokens the model computed in real steps: prefix-cache hits are
never computed, warm-up and dummy runs are excluded by a baseline taken at start)
and read by this process through one `collective_rpc`: on every scrape of /metrics
(so a scrape always reports every token computed before it), and every `interval`
seconds for the per-interval gauges. Nothing is done per token on the host. An idle
engine is not read: no request admitted since the last read, none running then or now,
means the counts cannot have changed, and each read wakes vLLM's worker, which then
busy-polls its queue for a second (a fifth of a core at the default 5 s interval).

Pools: a UniPool model's layers share pools; for vLLM's own MoE families every MoE layer has
its own experts, so "pool" p is MoE layer p, and layers without experts have no pool and no
series. Cardinality: per-layer and per-pool gauges are L series each; the per-expert counter
is pools x experts series (48 x 128 = 6,144 for Qwen3-30B-A3B), so it is exported only up to
UNIPOOL_METRICS_MAX_EXPERT_SERIES (default 2,048); above that a dashboard keeps the per-layer
imbalance, entropy and active-experts gauges, and the full [L, E] counts stay one
`collective_rpc("unipool_routing_stats")` away (docs/server.md, "Metrics").

Exported (see deploy/observability/metric_names.txt):
  unipool_expert_tokens_total{pool,expert}   counter  token-slots routed (tokens x layers x top-k)
  unipool_layer_load_imbalance_ratio{layer}  gauge    max/mean expert share in the last interval
  unipool_layer_routing_entropy_bits{layer}  gauge    entropy of the expert shares in the last interval
  unipool_pool_active_experts_ratio{pool}    gauge    share of the pool's experts that got any token
  unipool_steering_requests_total{profile}   counter  requests admitted, by profile ("none" = unsteered)
  unipool_steering_errors_total{reason}      counter  requests rejected for steering reasons
  unipool_steering_rows_in_use               gauge    engine steering rows held (loaded profiles, and deleted
                                                      ones until their last request ends)
  unipool_probe_score{probe}                 histogram  prompt scores of the requests a probe scored
  unipool_probe_fired_total{probe}           counter  requests whose prompt made the probe fire
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable

import torch
from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from unipool_serve.model_executor.steering.contract import RPC_ROUTING_STATS

logger = logging.getLogger("unipool_serve.server")
PROBE_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 10)) + (0.95, 0.99, 1.0)


class PoolMetrics:
    """Holds the latest routing snapshot and exposes it as a Prometheus collector."""

    def __init__(self, registry, layer_to_pool: list[int | None], num_experts: int, interval: float,
                 max_expert_series: int = 2048, rows_in_use: Callable[[], int] = lambda: 0):
        self.layer_to_pool = layer_to_pool  # None: a layer without experts
        self.num_experts = num_experts
        pools = {p for p in layer_to_pool if p is not None}
        self.export_experts = len(pools) * num_experts <= max_expert_series
        if not self.export_experts:
            logger.info("unipool_expert_tokens_total not exported: %d pools x %d experts exceeds "
                        "UNIPOOL_METRICS_MAX_EXPERT_SERIES=%d (per-layer gauges are)", len(pools), num_experts,
                        max_expert_series)
        self.interval = interval
        self.rows_in_use = rows_in_use
        self.baseline: torch.Tensor | None = None  # [L, E] counts before serving started
        self.total = torch.zeros(len(layer_to_pool), num_experts, dtype=torch.int64)  # since serving started
        self.interval_start: torch.Tensor | None = None  # self.total when the last interval began
        self.layer_imbalance: dict[int, float] = {}
        self.layer_entropy: dict[int, float] = {}
        self.pool_active: dict[int, float] = {}
        self._reading = asyncio.Lock()  # one RPC at a time, whoever asks
        self.admitted = 0  # engine requests admitted since start
        self._admitted_at_read = -1  # ... at the last read (-1: never read)
        self._running_at_read = False
        self.requests = Counter("unipool_steering_requests", "Requests admitted, by steering profile",
                                ["profile"], registry=registry)
        self.errors = Counter("unipool_steering_errors", "Requests rejected for steering reasons",
                              ["reason"], registry=registry)
        self.probe_scores = Histogram("unipool_probe_score", "Prompt scores of the requests a probe scored",
                                      ["probe"], buckets=PROBE_BUCKETS, registry=registry)
        self.probe_fired = Counter("unipool_probe_fired", "Requests whose prompt made the probe fire", ["probe"],
                                   registry=registry)
        registry.register(self)

    def count_request(self, profile: str | None) -> None:
        """One engine request admitted (profile None: unsteered)."""
        self.admitted += 1
        self.requests.labels(profile=profile or "none").inc()

    def record_probe(self, name: str, scores: dict) -> None:
        """One request's scores of probe `name` ({"score", "fired", ...}; a NaN score: its row changed)."""
        if math.isfinite(scores.get("score", math.nan)):
            self.probe_scores.labels(probe=name).observe(scores["score"])
        if scores.get("fired"):
            self.probe_fired.labels(probe=name).inc()

    # ---- reading the engine -------------------------------------------------
    async def refresh(self, engine_client) -> torch.Tensor:
        """Read the engine's cumulative counts; returns (and keeps) the total since serving started.
        Under the lock, so a caller that finds the engine idle still sees the read in flight before it."""
        async with self._reading:
            running = engine_client.get_num_unfinished_requests() > 0
            if not (running or self._running_at_read or self.admitted != self._admitted_at_read):
                return self.total  # idle since the last read: nothing was computed
            self._admitted_at_read, self._running_at_read = self.admitted, running
            results = await engine_client.collective_rpc(RPC_ROUTING_STATS)
        # [L, E] per worker: TP ranks of a stage count alike, other pipeline stages count zero for
        # layers they do not hold, so the elementwise max is each layer's count.
        counts = torch.stack([torch.as_tensor(r, dtype=torch.int64) for r in results]).amax(0)
        if self.baseline is None:
            self.baseline = counts.clone()
        self.total = counts - self.baseline
        return self.total

    def update_gauges(self, total: torch.Tensor) -> None:
        """total: [L, E] token-slots per layer and pool expert since serving started."""
        start = self.interval_start if self.interval_start is not None else torch.zeros_like(total)
        self.interval_start = total.clone()
        per_layer = (total - start).double()
        for layer, row in enumerate(per_layer):
            if self.layer_to_pool[layer] is None:
                continue
            tokens = row.sum().item()
            if tokens <= 0:
                continue
            share = row / tokens
            self.layer_imbalance[layer] = float(share.max() * self.num_experts)
            nonzero = share[share > 0]
            self.layer_entropy[layer] = float(-(nonzero * nonzero.log2()).sum())
        for pool in sorted({p for p in self.layer_to_pool if p is not None}):
            rows = per_layer[[l for l, p in enumerate(self.layer_to_pool) if p == pool]].sum(0)
            if rows.sum() > 0:
                self.pool_active[pool] = float((rows > 0).double().mean())

    # ---- prometheus_client collector protocol -------------------------------
    def describe(self):
        return []

    def collect(self):
        tokens = CounterMetricFamily("unipool_expert_tokens", "Token-slots routed to each pool expert "
                                     "(summed over the pool's layers and top-k slots)", labels=["pool", "expert"])
        by_pool: dict[int, torch.Tensor] = {}
        for layer, pool in enumerate(self.layer_to_pool):
            if pool is not None and self.export_experts:
                by_pool[pool] = by_pool.get(pool, 0) + self.total[layer]
        for pool, row in sorted(by_pool.items()):
            for expert, value in enumerate(row.tolist()):
                tokens.add_metric([str(pool), str(expert)], value)
        yield tokens
        rows = GaugeMetricFamily("unipool_steering_rows_in_use", "Engine steering rows held: loaded profiles, and "
                                 "deleted ones until their last request ends")
        rows.add_metric([], self.rows_in_use())
        yield rows
        for name, doc, values, label in (
            ("unipool_layer_load_imbalance_ratio", "Max/mean expert share in the last interval", self.layer_imbalance, "layer"),
            ("unipool_layer_routing_entropy_bits", "Entropy of the expert shares in the last interval", self.layer_entropy, "layer"),
            ("unipool_pool_active_experts_ratio", "Share of the pool's experts that got any token in the last interval", self.pool_active, "pool"),
        ):
            family = GaugeMetricFamily(name, doc, labels=[label])
            for key, value in sorted(values.items()):
                if math.isfinite(value):
                    family.add_metric([str(key)], value)
            yield family
