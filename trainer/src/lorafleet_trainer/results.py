"""What engine calls return: adapter state, init and step results, and counters for metrics.

Plain dataclasses with ``to_dict`` giving the HTTP API's snake_case JSON, so the service layer
only serialises and never reaches into the engine's internals.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lorafleet_trainer.configs import LoraSpec, TrainingSpec
from lorafleet_trainer.ids import AdapterId


@dataclass(frozen=True)
class AdapterState:
    adapter: AdapterId
    version: int
    epoch: int
    lora: LoraSpec
    training: TrainingSpec
    cached: bool
    cache_bytes: int
    pinned: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "namespace": self.adapter.namespace,
            "name": self.adapter.name,
            "version": self.version,
            "epoch": self.epoch,
            "lora": self.lora.to_dict(),
            "cached": self.cached,
            "cache_bytes": self.cache_bytes,
        }


@dataclass(frozen=True)
class InitResult:
    created: bool
    state: AdapterState


@dataclass(frozen=True)
class StepResult:
    version: int
    cache_hit: bool
    metrics: dict[str, float]
    timing_ms: dict[str, float]
    storage_read_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "cache": "hit" if self.cache_hit else "miss",
            "metrics": dict(self.metrics),
            "timing_ms": dict(self.timing_ms),
        }


@dataclass(frozen=True)
class EngineStats:
    """A consistent snapshot of the engine's monotonic counters and gauges."""

    cache_hits: int = 0
    cache_misses: int = 0
    evictions: dict[str, int] = field(default_factory=dict)
    storage_read_bytes: int = 0
    storage_write_bytes: int = 0
    tokens: int = 0
    steps_ok: int = 0
    steps_failed: int = 0
    cache_entries: int = 0
    cache_bytes: int = 0
    cache_capacity_bytes: int = 0
    host_pinned_bytes: int = 0
    gpu_memory_allocated_bytes: int = 0
    gpu_memory_reserved_bytes: int = 0
    gpu_memory_peak_bytes: int = 0
    gpu_memory_after_step_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
