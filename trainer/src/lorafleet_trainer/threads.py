"""How many intra-op threads torch may use: as many CPUs as this container may really run on.

torch starts one thread per host core. In a container limited to fewer CPUs, those threads wait on
each other (OpenMP barriers) and the kernel throttles the whole group at its CFS quota, so a step
can take ten times longer than with the right count. The count comes, in order, from the
``--threads`` flag, the cgroup's CPU quota (v2 ``cpu.max``; v1 ``cpu.cfs_quota_us`` over
``cpu.cfs_period_us``), the container's CPU request (the pod's downward API), and last the CPUs this
process may be scheduled on. A fractional quota rounds down (at least one thread): one thread more
than the quota allows is throttled every period.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class ThreadPlan:
    """The thread count and where it came from (logged at start, so an operator can check it)."""

    threads: int
    source: str


def _own_path(proc_cgroup: Path, controller: str | None) -> str:
    """This process's cgroup path for a v1 controller (or v2 when ``controller`` is None)."""
    try:
        lines = proc_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        return "/"
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if (controller is None and controllers == "") or (controller in controllers.split(",")):
            return path
    return "/"


def _candidates(base: Path, path: str) -> list[Path]:
    # Inside a container the cgroup namespace makes its own group the root; outside one the group
    # lives at base/<path>. Try the deepest first, then each parent: a quota set above still binds.
    here = base / path.lstrip("/")
    return [here, *here.parents[: len(here.relative_to(base).parts)]] if here != base else [base]


def _v2_quota(root: Path, proc_cgroup: Path) -> float | None:
    for d in _candidates(root, _own_path(proc_cgroup, None)):
        try:
            quota, period = (d / "cpu.max").read_text(encoding="utf-8").split()
        except (OSError, ValueError):
            continue
        if quota != "max":
            return int(quota) / int(period)
    return None


def _v1_quota(root: Path, proc_cgroup: Path) -> float | None:
    for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        base = root / name
        if not base.is_dir():
            continue
        for d in _candidates(base, _own_path(proc_cgroup, "cpu")):
            try:
                quota = int((d / "cpu.cfs_quota_us").read_text(encoding="utf-8"))
                period = int((d / "cpu.cfs_period_us").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if quota > 0 and period > 0:
                return quota / period
        return None
    return None


def cgroup_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs allowed by the cgroup CPU quota (e.g. 1.5), or None when no quota applies."""
    quota = _v2_quota(root, proc_cgroup) if (root / "cgroup.controllers").exists() else None
    return quota if quota is not None else _v1_quota(root, proc_cgroup)


def schedulable_cpus() -> int:
    """CPUs this process may be scheduled on (its affinity mask, e.g. a cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def plan(
    flag: int | None,
    cpu_request_millicores: int | None,
    root: Path = CGROUP_ROOT,
    proc_cgroup: Path = Path("/proc/self/cgroup"),
) -> ThreadPlan:
    """The intra-op thread count for this container, and its source."""
    cpus = schedulable_cpus()
    if flag is not None:
        return ThreadPlan(flag, "--threads")
    quota = cgroup_cpus(root, proc_cgroup)
    if quota is not None:
        return ThreadPlan(max(1, min(cpus, math.floor(quota))), f"cgroup CPU quota {quota:g}")
    if cpu_request_millicores is not None:
        cores = cpu_request_millicores / 1000
        return ThreadPlan(max(1, min(cpus, math.floor(cores))), f"CPU request {cores:g}")
    return ThreadPlan(cpus, "schedulable CPUs")


def apply(chosen: ThreadPlan) -> None:
    """Set torch's intra-op thread count (before the model loads) and log it."""
    import torch

    torch.set_num_threads(chosen.threads)
    log.info("torch intra-op threads: %d (from %s)", chosen.threads, chosen.source)


def export(registry: CollectorRegistry, chosen: ThreadPlan) -> None:
    """``lorafleet_trainer_cpu_threads``: the count in use, so a dashboard can set it beside CPU use."""
    gauge = Gauge(
        "cpu_threads",
        "Intra-op CPU threads torch uses (from --threads, the cgroup CPU quota or the CPU request).",
        namespace="lorafleet",
        subsystem="trainer",
        registry=registry,
    )
    gauge.set(chosen.threads)
