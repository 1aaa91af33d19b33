"""A real Prometheus (the Debian package) scrapes a live trainer; every trainer metric of
DESIGN.md answers a PromQL query with at least one series."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.trainer.service import live, payloads

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


def query(port: int, promql: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    answer = httpx.get(url, timeout=10).json()
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


@pytest.fixture
def prometheus(tmp_path: Path, trainer: live.LiveTrainer) -> Any:
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(binary).exists():
        pytest.fail("prometheus is not installed (Debian package `prometheus`; `make system-deps`)")
    config = {
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "trainer",
                "scrape_timeout": "1s",
                "static_configs": [{"targets": [f"127.0.0.1:{trainer.port}"]}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = live.free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    yield port
    process.terminate()
    process.wait(30)
    log.close()


def test_prometheus_scrapes_every_trainer_metric(trainer: live.LiveTrainer, prometheus: int) -> None:
    c = trainer.client()
    assert c.put("/v1/adapters/prom/one", json=payloads.init_body()).status_code == 201
    for _ in range(2):
        assert c.post("/v1/adapters/prom/one/distill", json=payloads.distill_body()).status_code == 200
    deadline = time.monotonic() + 60
    missing = METRICS
    while True:
        try:
            missing = [m for m in METRICS if not query(prometheus, m)]
        except httpx.TransportError:
            pass  # not listening yet
        else:
            if not missing and query(prometheus, 'up{job="trainer"} == 1'):
                steps = query(prometheus, 'lorafleet_trainer_steps_total{outcome="ok"}')
                if float(steps[0]["value"][1]) >= 2:
                    break
        assert time.monotonic() < deadline, f"no series for {missing}"
        time.sleep(0.5)
    hits = query(prometheus, "lorafleet_trainer_cache_hits_total")
    assert float(hits[0]["value"][1]) >= 1
