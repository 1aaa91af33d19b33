"""The trainer's metric names, labels and the engine collector (one registry per app)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lorafleet_trainer.service.metrics import PREFIX, TrainerMetrics


@dataclass
class Stats:
    """The shape of engine.stats(), filled with distinct numbers so a mix-up shows."""

    cache_hits: int = 11
    cache_misses: int = 12
    evictions: dict[str, int] = field(default_factory=lambda: {"lru": 1, "explicit": 2, "deleted": 4})
    storage_read_bytes: int = 1300
    storage_write_bytes: int = 1400
    tokens: int = 15
    cache_entries: int = 16
    cache_bytes: int = 1700
    cache_capacity_bytes: int = 1800
    host_pinned_bytes: int = 19
    gpu_memory_allocated_bytes: int = 0
    gpu_memory_reserved_bytes: int = 0
    gpu_memory_peak_bytes: int = 0
    gpu_memory_after_step_bytes: int = 0
    durable_lag_versions: int = 21
    write_backlog_versions: int = 22
    writes_coalesced: int = 23
    write_failures: int = 24


class Source:
    def __init__(self) -> None:
        self.current = Stats()
        self.fail = False

    def stats(self) -> Stats:
        if self.fail:
            raise RuntimeError("engine gone")
        return self.current


def samples(m: TrainerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(m.registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_engine_stats_are_read_at_scrape_time_under_design_names() -> None:
    source = Source()
    m = TrainerMetrics(source, queue_depth=lambda: 3, busy=lambda: True)
    got = samples(m)
    assert got[(PREFIX + "cache_hits_total", ())] == 11
    assert got[(PREFIX + "cache_misses_total", ())] == 12
    assert got[(PREFIX + "storage_read_bytes_total", ())] == 1300
    assert got[(PREFIX + "storage_write_bytes_total", ())] == 1400
    assert got[(PREFIX + "tokens_total", ())] == 15
    assert got[(PREFIX + "cache_entries", ())] == 16
    assert got[(PREFIX + "cache_bytes", ())] == 1700
    assert got[(PREFIX + "cache_capacity_bytes", ())] == 1800
    assert got[(PREFIX + "host_pinned_bytes", ())] == 19
    assert got[(PREFIX + "gpu_memory_peak_bytes", ())] == 0
    assert got[(PREFIX + "durable_lag_versions", ())] == 21
    assert got[(PREFIX + "write_backlog_versions", ())] == 22
    assert got[(PREFIX + "writes_coalesced_total", ())] == 23
    assert got[(PREFIX + "write_failures_total", ())] == 24
    assert got[(PREFIX + "queue_depth", ())] == 3
    assert got[(PREFIX + "step_running", ())] == 1
    reasons = {dict(k[1])["reason"]: v for k, v in got.items() if k[0] == PREFIX + "cache_evictions_total"}
    assert reasons == {"lru": 1, "explicit": 2, "invalidated": 0, "deleted": 4}
    source.current = Stats(cache_hits=99)
    assert samples(m)[(PREFIX + "cache_hits_total", ())] == 99
    assert any(name.startswith("process_") for name, _ in got)


def test_step_observations_land_in_their_labels() -> None:
    m = TrainerMetrics(Source(), queue_depth=lambda: 0)
    m.observe_step("hit", 0.2, {"queue": 5.0, "restore": 1.0, "compute": 150.0, "bogus": 1.0})
    m.observe_step("miss", 0.3, {}, fused_adapters=3)
    m.count_outcome("rejected")
    got = samples(m)
    fused = PREFIX + "step_fused_adapters"
    assert got[(fused + "_count", ())] == 2 and got[(fused + "_sum", ())] == 4
    assert got[(fused + "_bucket", (("le", "1.0"),))] == 1 and got[(fused + "_bucket", (("le", "2.0"),))] == 1
    assert got[(PREFIX + "step_duration_seconds_count", (("cache", "hit"),))] == 1
    assert got[(PREFIX + "step_duration_seconds_sum", (("cache", "hit"),))] == pytest.approx(0.2)
    assert got[(PREFIX + "step_duration_seconds_count", (("cache", "miss"),))] == 1
    phase_sum = PREFIX + "step_phase_duration_seconds_sum"
    assert got[(phase_sum, (("phase", "compute"),))] == pytest.approx(0.15)
    assert got[(phase_sum, (("phase", "persist"),))] == 0
    assert not any(dict(k[1]).get("phase") == "bogus" for k in got)
    assert got[(PREFIX + "steps_total", (("outcome", "ok"),))] == 2
    assert got[(PREFIX + "steps_total", (("outcome", "rejected"),))] == 1
    assert got[(PREFIX + "steps_total", (("outcome", "error"),))] == 0
    with pytest.raises(ValueError):
        m.count_outcome("mystery")


def test_a_failing_engine_read_keeps_the_other_metrics() -> None:
    source = Source()
    source.fail = True
    got = samples(TrainerMetrics(source, queue_depth=lambda: 0))
    assert (PREFIX + "queue_depth", ()) in got
    assert not any(name == PREFIX + "cache_hits_total" for name, _ in got)


def test_two_apps_in_one_process_do_not_share_a_registry() -> None:
    a = TrainerMetrics(Source(), queue_depth=lambda: 1)
    b = TrainerMetrics(Source(), queue_depth=lambda: 2)
    a.count_outcome("error")
    assert samples(a)[(PREFIX + "steps_total", (("outcome", "error"),))] == 1
    assert samples(b)[(PREFIX + "steps_total", (("outcome", "error"),))] == 0
