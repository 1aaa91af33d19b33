"""Thread sizing from fake cgroup trees: v2 cpu.max, v1 CFS quota, the request, and the flag."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from lorafleet_trainer import threads


@pytest.fixture(autouse=True)
def eight_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    # The host's real CPU count must not decide these tests: pretend the process may use 8.
    monkeypatch.setattr(threads, "schedulable_cpus", lambda: 8)


def v2_tree(tmp_path: Path, cpu_max: str, *, group: str = "/") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    (root / group.lstrip("/")).mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpu memory\n")
    (root / group.lstrip("/") / "cpu.max").write_text(cpu_max + "\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(f"0::{group}\n")
    return root, proc


def v1_tree(tmp_path: Path, quota: int, period: int, *, mount: str = "cpu,cpuacct") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    group = root / mount / "kubepods" / "pod1" / "c1"
    group.mkdir(parents=True)
    (group / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (group / "cpu.cfs_period_us").write_text(f"{period}\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("12:memory:/kubepods/pod1/c1\n4:cpu,cpuacct:/kubepods/pod1/c1\n")
    return root, proc


QUOTAS = [("200000 100000", 2), ("150000 100000", 1), ("50000 100000", 1)]


@pytest.mark.parametrize(("cpu_max", "want"), QUOTAS)
def test_cgroup_v2_quota_sets_threads(tmp_path: Path, cpu_max: str, want: int) -> None:
    root, proc = v2_tree(tmp_path, cpu_max)
    chosen = threads.plan(None, None, root, proc)
    assert chosen.threads == want
    assert "cgroup CPU quota" in chosen.source


def test_cgroup_v2_quota_of_the_process_own_group(tmp_path: Path) -> None:
    root, proc = v2_tree(tmp_path, "400000 100000", group="/kubepods.slice/pod1/c1")
    assert threads.cgroup_cpus(root, proc) == 4.0
    assert threads.plan(None, None, root, proc).threads == 4


def test_cgroup_v2_without_quota_falls_back_to_the_request(tmp_path: Path) -> None:
    root, proc = v2_tree(tmp_path, "max 100000")
    assert threads.cgroup_cpus(root, proc) is None
    chosen = threads.plan(None, 3000, root, proc)
    assert (chosen.threads, chosen.source) == (3, "CPU request 3")


@pytest.mark.parametrize("mount", ["cpu,cpuacct", "cpu"])
def test_cgroup_v1_cfs_quota_sets_threads(tmp_path: Path, mount: str) -> None:
    root, proc = v1_tree(tmp_path, 300000, 100000, mount=mount)
    assert threads.plan(None, None, root, proc).threads == 3


def test_cgroup_v1_unlimited_quota_is_no_quota(tmp_path: Path) -> None:
    root, proc = v1_tree(tmp_path, -1, 100000)
    assert threads.cgroup_cpus(root, proc) is None
    assert threads.plan(None, None, root, proc) == threads.ThreadPlan(8, "schedulable CPUs")


def test_quota_above_the_schedulable_cpus_is_capped(tmp_path: Path) -> None:
    root, proc = v2_tree(tmp_path, "1600000 100000")
    assert threads.plan(None, None, root, proc).threads == 8


def test_the_flag_wins_over_the_quota(tmp_path: Path) -> None:
    root, proc = v2_tree(tmp_path, "200000 100000")
    assert threads.plan(6, 1000, root, proc) == threads.ThreadPlan(6, "--threads")


def test_a_fractional_request_rounds_down_to_at_least_one(tmp_path: Path) -> None:
    empty = tmp_path / "none"
    empty.mkdir()
    assert threads.plan(None, 500, empty, empty / "cgroup").threads == 1
    assert threads.plan(None, 2500, empty, empty / "cgroup").threads == 2


def test_the_count_is_a_metric() -> None:
    registry = CollectorRegistry()
    threads.export(registry, threads.ThreadPlan(3, "--threads"))
    assert registry.get_sample_value("lorafleet_trainer_cpu_threads") == 3.0
