"""Prometheus metrics of one trainer pod, named ``lorafleet_trainer_<name>_<unit>`` (DESIGN.md).

The service owns what it observes itself (step durations, outcomes, queue depth); the engine's
own counters and gauges (cache, storage I/O, tokens, GPU memory) are read from ``engine.stats()``
by a collector at scrape time, so there is one source for each number and no copy to drift.
Each app gets its own ``CollectorRegistry``: several apps in one process never clash.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lorafleet_trainer.service.publishing import REASONS as PUBLISH_FAILURE_REASONS
from lorafleet_trainer.service.publishing import Publisher, PublishObserver

log = logging.getLogger(__name__)

NAMESPACE = "lorafleet"
SUBSYSTEM = "trainer"
PREFIX = f"{NAMESPACE}_{SUBSYSTEM}_"

CACHE_LABELS = ("hit", "miss")
PHASES = ("queue", "restore", "compute", "snapshot", "persist")
OUTCOMES = ("ok", "replayed", "invalid", "rejected", "cancelled", "unavailable", "error")
EVICTION_REASONS = ("lru", "explicit", "invalidated", "deleted")
# From a tiny CPU model's tens of milliseconds to a large model's minutes on one GPU.
FUSED_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# A load into a CPU vLLM takes about a second; a server that is down holds versions for minutes.
PUBLISH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0)

# engine.stats() attribute -> (metric name without prefix, help); counters get `_total` on exposition.
ENGINE_COUNTERS = {
    "cache_hits": ("cache_hits", "Distill steps that found the adapter in the CPU cache."),
    "cache_misses": ("cache_misses", "Distill steps that had to load the adapter from storage."),
    "storage_read_bytes": ("storage_read_bytes", "Adapter bytes read from the adapter store."),
    "storage_write_bytes": ("storage_write_bytes", "Adapter bytes written to the adapter store."),
    "tokens": ("tokens", "Tokens processed by distill steps."),
    "writes_coalesced": (
        "writes_coalesced",
        "Durability async: committed versions never written because a newer one replaced them.",
    ),
    "write_failures": ("write_failures", "Durability async: background writes the adapter store refused."),
}
ENGINE_GAUGES = {
    "cache_entries": ("cache_entries", "Adapters held in the CPU cache."),
    "cache_bytes": ("cache_bytes", "Bytes of LoRA weights and optimizer state in the CPU cache."),
    "cache_capacity_bytes": ("cache_capacity_bytes", "Capacity of the CPU cache in bytes."),
    "host_pinned_bytes": (
        "host_pinned_bytes",
        "Page-locked host memory as the pinned allocator counts it (rounded blocks, cached ones "
        "included) plus the registered base weights; 0 without CUDA.",
    ),
    "gpu_memory_allocated_bytes": ("gpu_memory_allocated_bytes", "GPU memory held by tensors (0 on CPU)."),
    "gpu_memory_reserved_bytes": ("gpu_memory_reserved_bytes", "GPU memory reserved by the allocator."),
    "gpu_memory_peak_bytes": ("gpu_memory_peak_bytes", "Peak GPU memory held by tensors."),
    "gpu_memory_after_step_bytes": (
        "gpu_memory_after_step_bytes",
        "GPU memory held by tensors right after the last step (the between-steps level; 0 on CPU).",
    ),
    "durable_lag_versions": (
        "durable_lag_versions",
        "Most versions any adapter's latest is ahead of its durable version: what a crash would lose "
        "(0 with durability sync).",
    ),
    "write_backlog_versions": (
        "write_backlog_versions",
        "Durability async: versions waiting for the background writer or being written.",
    ),
}


class StatsSource(Protocol):
    """What the collector needs from the engine: a snapshot of its counters and gauges."""

    def stats(self) -> Any: ...


class EngineCollector(Collector):
    """Reads ``engine.stats()`` once per scrape and exposes it under the trainer's names."""

    def __init__(self, source: StatsSource) -> None:
        self._source = source

    def describe(self) -> Iterable[Metric]:
        # An empty describe keeps registration from calling stats() before the engine exists.
        return []

    def collect(self) -> Iterable[Metric]:
        try:
            stats = self._source.stats()
        except Exception:
            # One failed read must not take the process metrics down with it.
            log.exception("engine.stats() failed; engine metrics skipped in this scrape")
            return
        for attr, (name, doc) in ENGINE_COUNTERS.items():
            yield CounterMetricFamily(PREFIX + name, doc, value=float(getattr(stats, attr)))
        evictions = CounterMetricFamily(
            PREFIX + "cache_evictions", "Adapters removed from the CPU cache, by reason.", labels=["reason"]
        )
        counts: Mapping[str, int] = getattr(stats, "evictions", {}) or {}
        for reason in sorted(set(EVICTION_REASONS) | set(counts)):
            evictions.add_metric([reason], float(counts.get(reason, 0)))
        yield evictions
        for attr, (name, doc) in ENGINE_GAUGES.items():
            yield GaugeMetricFamily(PREFIX + name, doc, value=float(getattr(stats, attr)))


class TrainerMetrics:
    """The registry behind ``/metrics`` and the service-side instruments that feed it."""

    def __init__(
        self, source: StatsSource, queue_depth: Callable[[], int], busy: Callable[[], bool] = lambda: False
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        common: dict[str, Any] = {"namespace": NAMESPACE, "subsystem": SUBSYSTEM, "registry": self.registry}
        self.step_duration = Histogram(
            "step_duration",
            "Time a distill step ran on the worker (queue wait excluded), by cache hit or miss.",
            labelnames=["cache"],
            unit="seconds",
            buckets=STEP_BUCKETS,
            **common,
        )
        self.step_phase_duration = Histogram(
            "step_phase_duration",
            "Time spent in each phase of a distill step (queue, restore, compute, snapshot, persist).",
            labelnames=["phase"],
            unit="seconds",
            buckets=STEP_BUCKETS,
            **common,
        )
        self.step_fused_adapters = Histogram(
            "step_fused_adapters",
            "Per committed step: the adapters whose steps shared its forward and backward (1: alone).",
            buckets=FUSED_BUCKETS,
            **common,
        )
        self.steps = Counter("steps", "Distill requests by outcome.", labelnames=["outcome"], **common)
        self.queue_depth = Gauge("queue_depth", "Writes waiting for the step worker.", **common)
        self.queue_depth.set_function(lambda: float(queue_depth()))
        # Beside the depth (which counts only waiting writes): whether the worker is busy now.
        self.step_running = Gauge("step_running", "1 while a write runs on the step worker.", **common)
        self.step_running.set_function(lambda: 1.0 if busy() else 0.0)
        # Create every labelled child up front so each series exists from the first scrape.
        for label in CACHE_LABELS:
            self.step_duration.labels(cache=label)
        for phase in PHASES:
            self.step_phase_duration.labels(phase=phase)
        for outcome in OUTCOMES:
            self.steps.labels(outcome=outcome)
        self.publish_duration = Histogram(
            "publish_duration",
            "Time from a version's commit until an inference server serves it, per server.",
            unit="seconds",
            buckets=PUBLISH_BUCKETS,
            **common,
        )
        self.publish_failures = Counter(
            "publish_failures",
            "Failed calls to inference servers while publishing, by reason.",
            labelnames=["reason"],
            **common,
        )
        for reason in PUBLISH_FAILURE_REASONS:
            self.publish_failures.labels(reason=reason)
        self.publish_lag_versions = Gauge(
            "publish_lag_versions",
            "Most versions any inference server is behind on any adapter this pod owns.",
            **common,
        )
        self.publish_lag_seconds = Gauge(
            "publish_lag_seconds",
            "How long the oldest committed version no server serves yet has waited (0: all served).",
            **common,
        )
        self.inference_servers = Gauge(
            "inference_servers", "Inference servers this pod publishes to.", **common
        )
        self.registry.register(EngineCollector(source))
        ProcessCollector(registry=self.registry)

    def publish_observer(self) -> PublishObserver:
        return PublishObserver(
            published=self.publish_duration.observe,
            failed=lambda reason: self.publish_failures.labels(reason=reason).inc(),
        )

    def watch_publishing(self, publisher: Publisher) -> None:
        """Lag and server count are read from the publisher at scrape time."""
        self.publish_lag_versions.set_function(lambda: float(publisher.lag()[0]))
        self.publish_lag_seconds.set_function(lambda: publisher.lag()[1])
        self.inference_servers.set_function(lambda: float(len(publisher.servers)))

    def observe_step(
        self, cache: str, run_seconds: float, phases_ms: Mapping[str, float], fused_adapters: int = 1
    ) -> None:
        """Record one successful step: its run time, every phase the engine timed and how many
        adapters' steps ran fused with it (itself included)."""
        self.step_duration.labels(cache=cache).observe(run_seconds)
        self.step_fused_adapters.observe(fused_adapters)
        for phase, ms in phases_ms.items():
            if phase in PHASES:
                self.step_phase_duration.labels(phase=phase).observe(max(0.0, ms) / 1000.0)
        self.steps.labels(outcome="ok").inc()

    def count_outcome(self, outcome: str) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown step outcome {outcome!r}")
        self.steps.labels(outcome=outcome).inc()
