"""The operator's Prometheus metrics (``lorafleet_operator_*``) and its small /metrics + /healthz server.

The server starts before leader election, so a standby replica still answers its liveness probe
and shows that it is not acting (``lorafleet_operator_leader`` is 0).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PHASES = ("Pending", "Placed", "Ready", "Failed", "Terminating")
# Where a reconcile error was retried or skipped (the ``path`` of ``reconcile_errors_total``):
# each kopf handler, and the calls inside a reconcile whose failure is skipped.
ERROR_PATHS = (
    "pool_change",  # a TrainerPool created, changed or resumed (kopf retries)
    "pool_resync",  # the TrainerPool timer (the next tick tries again)
    "pool_cache_report",  # a trainer's /v1/cache for the pool status (the last figure is kept)
    "pod_event",  # a trainer pod event: syncing its pool (the next event or resync tries again)
    "pod_event_adapter",  # a trainer pod event: moving or placing one adapter (its timer retries)
    "adapter_change",  # a LoraAdapter created, changed or resumed (kopf retries)
    "adapter_resync",  # the LoraAdapter timer (the next tick tries again)
    "adapter_poll",  # a Ready adapter's state on its trainer (the next resync polls again)
    "adapter_delete",  # a LoraAdapter's deletion: eviction or its reads (kopf retries)
    "adapter_terminating",  # the cosmetic Terminating phase before an eviction (skipped)
    "adapter_follow",  # writing a followed trainer change to the status (the resync writes it)
    "serving_sync",  # telling a trainer pod its servers and adapters (the next sync tries again)
    "server_event",  # an inference server pod event: syncing its pools (the resync tries again)
)


class OperatorMetrics:
    """All operator metrics, registered in one registry (a private one in tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.adapters = Gauge("adapters", "LoraAdapters by phase.", ["phase"], **self._names())
        self.placements = Counter("placements", "Adapters placed on a pod.", **self._names())
        self.reschedules = Counter(
            "reschedules", "Adapters placed again because their pod went away.", **self._names()
        )
        self.evictions = Counter(
            "evictions", "Cache evictions on adapter deletion.", ["outcome"], **self._names()
        )
        self.reconcile_duration = Histogram(
            "reconcile_duration", "Time of one reconcile.", unit="seconds", **self._names()
        )
        self.reconcile_errors = Counter(
            "reconcile_errors", "Reconcile errors retried or skipped, by path.", ["path"], **self._names()
        )
        self.trainer_requests = Counter(
            "trainer_requests", "Calls to trainer pods.", ["route", "code"], **self._names()
        )
        self.leader = Gauge("leader", "1 while this replica holds the lease.", **self._names())
        self._phases: dict[tuple[str, str], str] = {}
        for phase in PHASES:
            self.adapters.labels(phase=phase).set(0)
        for path in ERROR_PATHS:
            self.reconcile_errors.labels(path=path)  # every path shows, at 0 until it fails

    def _names(self) -> dict[str, Any]:
        return {"namespace": "lorafleet", "subsystem": "operator", "registry": self.registry}

    def set_phase(self, namespace: str, name: str, phase: str | None) -> None:
        """Record an adapter's phase (None: the adapter is gone) and refresh the per-phase gauge."""
        if phase is None:
            self._phases.pop((namespace, name), None)
        else:
            self._phases[(namespace, name)] = phase
        for known in PHASES:
            self.adapters.labels(phase=known).set(sum(1 for p in self._phases.values() if p == known))


@contextlib.asynccontextmanager
async def serving(metrics: OperatorMetrics, host: str, port: int) -> AsyncIterator[int]:
    """Serve /metrics and /healthz until the context exits; yields the bound port (0 picks one)."""

    async def metrics_view(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    # Port 0 asks the OS for a free port (tests); report the one it gave.
    bound = runner.addresses[0][1] if runner.addresses else port
    try:
        yield bound
    finally:
        await runner.cleanup()
