"""A real Prometheus (the Debian package) scrapes a live trainer; every trainer metric of
DESIGN.md answers a PromQL query with at least one series."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.trainer.service import live, payloads

from lorafleet_local.prometheus import Prometheus, static_jobs

METRICS = [
    "lorafleet_trainer_cache_entries",
    "lorafleet_trainer_cache_bytes",
    "lorafleet_trainer_cache_capacity_bytes",
    "lorafleet_trainer_cache_hits_total",
    "lorafleet_trainer_cache_misses_total",
    'lorafleet_trainer_cache_evictions_total{reason="lru"}',
    'lorafleet_trainer_cache_evictions_total{reason="explicit"}',
    'lorafleet_trainer_cache_evictions_total{reason="invalidated"}',
    'lorafleet_trainer_cache_evictions_total{reason="deleted"}',
    "lorafleet_trainer_storage_read_bytes_total",
    "lorafleet_trainer_storage_write_bytes_total",
    'lorafleet_trainer_step_duration_seconds_bucket{cache="hit"}',
    'lorafleet_trainer_step_duration_seconds_count{cache="miss"}',
    'lorafleet_trainer_step_phase_duration_seconds_count{phase="compute"}',
    'lorafleet_trainer_step_phase_duration_seconds_count{phase="queue"}',
    'lorafleet_trainer_steps_total{outcome="ok"}',
    "lorafleet_trainer_tokens_total",
    "lorafleet_trainer_queue_depth",
    "lorafleet_trainer_gpu_memory_allocated_bytes",
    "lorafleet_trainer_gpu_memory_reserved_bytes",
    "lorafleet_trainer_gpu_memory_peak_bytes",
    "lorafleet_trainer_host_pinned_bytes",
    "process_resident_memory_bytes",
]


@pytest.fixture
def prometheus(tmp_path: Path, trainer: live.LiveTrainer) -> Iterator[Prometheus]:
    server = Prometheus(tmp_path / "prometheus")
    server.start(static_jobs({"trainer": (f"127.0.0.1:{trainer.port}", {})}))
    yield server
    server.stop()


def test_prometheus_scrapes_every_trainer_metric(trainer: live.LiveTrainer, prometheus: Prometheus) -> None:
    c = trainer.client()
    assert c.put("/v1/adapters/prom/one", json=payloads.init_body()).status_code == 201
    for _ in range(2):
        assert c.post("/v1/adapters/prom/one/distill", json=payloads.distill_body()).status_code == 200
    deadline = time.monotonic() + 60
    while True:
        missing = [m for m in METRICS if not prometheus.query(m)]
        up = not missing and prometheus.query('up{job="trainer"} == 1')
        if up and (prometheus.value('lorafleet_trainer_steps_total{outcome="ok"}') or 0) >= 2:
            break
        assert time.monotonic() < deadline, f"no series for {missing}"
        time.sleep(0.5)
    assert (prometheus.value("lorafleet_trainer_cache_hits_total") or 0) >= 1
