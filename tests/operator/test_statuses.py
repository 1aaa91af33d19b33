"""Status computation: pool status from pods, conditions that keep their transition times."""

from __future__ import annotations

import datetime
from typing import Any

from lorafleet_operator import placing, statuses

T0 = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(minutes=5)


def view(name: str, ready: bool) -> placing.PodView:
    return placing.PodView(name, "u", int(name.rsplit("-", 1)[1]), "10.0.0.1", ready, False, False, None)


def test_pool_status_counts_and_pods() -> None:
    status = statuses.compute_pool_status(
        replicas=3,
        pods=[view("p-1", True), view("p-0", True), view("p-2", False)],
        adapter_counts={"p-0": 4, "p-1": 3},
        cache_bytes={"p-0": 1000},
        generation=2,
        previous={},
        now=T0,
    )
    assert status["replicas"] == 3 and status["readyReplicas"] == 2
    assert [p["name"] for p in status["pods"]] == ["p-0", "p-1", "p-2"]
    assert status["pods"][0] == {"name": "p-0", "ready": True, "adapters": 4, "cacheBytes": 1000}
    (ready,) = status["conditions"]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False", "PodsNotReady")
    assert status["observedGeneration"] == 2


def test_condition_keeps_transition_time_until_status_flips() -> None:
    first = statuses.set_condition([], "Ready", True, "A", "a", now=T0)
    same = statuses.set_condition(first, "Ready", True, "B", "b", now=T1)
    assert same[0]["lastTransitionTime"] == "2026-01-01T12:00:00Z"
    assert same[0]["reason"] == "B"
    flipped = statuses.set_condition(same, "Ready", False, "C", "c", now=T1)
    assert flipped[0]["lastTransitionTime"] == "2026-01-01T12:05:00Z"
    both = statuses.set_condition(flipped, "Placed", True, "P", "p", now=T1)
    assert [c["type"] for c in both] == ["Placed", "Ready"]


def test_unchanged_status_is_not_patched() -> None:
    def compute(previous: dict[str, Any], now: datetime.datetime) -> dict[str, Any]:
        return statuses.compute_pool_status(
            replicas=1,
            pods=[view("p-0", True)],
            adapter_counts={},
            cache_bytes={},
            generation=1,
            previous=previous,
            now=now,
        )

    status = compute({}, T0)
    again = compute(status, T1)
    assert not statuses.differs(status, again)
    assert statuses.differs(status, {**again, "readyReplicas": 0})
