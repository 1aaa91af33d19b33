"""Placement rules: fewest adapters, then least cache bytes, within the cap; sticky until the pod goes."""

from __future__ import annotations

import datetime
from typing import Any

from lorafleet_operator import placing
from lorafleet_operator.placing import Move, PodLoad

NOW = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.UTC)
GRACE = datetime.timedelta(seconds=60)


def pod(
    name: str, *, ready: bool = True, ip: str | None = "10.0.0.1", uid: str = "u1", **status: Any
) -> dict[str, Any]:
    condition = {"type": "Ready", "status": "True" if ready else "False"}
    if "since" in status:
        condition["lastTransitionTime"] = status.pop("since")
    body: dict[str, Any] = {
        "metadata": {"name": name, "uid": uid},
        "status": {"conditions": [condition], **({"podIP": ip} if ip else {}), **status},
    }
    return body


def test_view_pod_ready_needs_condition_and_ip() -> None:
    assert placing.view_pod(pod("p-0"), "p").ready
    assert placing.view_pod(pod("p-0"), "p").ordinal == 0
    assert not placing.view_pod(pod("p-0", ip=None), "p").ready
    assert not placing.view_pod(pod("p-0", ready=False), "p").ready
    assert not placing.view_pod(pod("p-0", phase="Failed"), "p").ready
    assert placing.view_pod(pod("other-0"), "p").ordinal is None


def test_choose_fewest_then_least_cache_then_ordinal() -> None:
    candidates = [PodLoad("p-0", 3, 10, 0), PodLoad("p-1", 2, 500, 1), PodLoad("p-2", 2, 100, 2)]
    chosen = placing.choose_pod(candidates, 64)
    assert chosen is not None and chosen.name == "p-2"
    tie = [PodLoad("p-1", 1, 0, 1), PodLoad("p-0", 1, 0, 0)]
    chosen = placing.choose_pod(tie, 64)
    assert chosen is not None and chosen.name == "p-0"


def test_choose_respects_the_cap_and_empty_pools() -> None:
    assert placing.choose_pod([PodLoad("p-0", 2, 0, 0)], 2) is None
    assert placing.choose_pod([], 2) is None
    chosen = placing.choose_pod([PodLoad("p-0", 2, 0, 0), PodLoad("p-1", 5, 0, 1)], 3)
    assert chosen is not None and chosen.name == "p-0"


def test_loads_count_only_ready_pods_within_replicas() -> None:
    views = [placing.view_pod(pod(f"p-{i}"), "p") for i in range(3)]
    views.append(placing.view_pod(pod("p-3", ready=False), "p"))
    result = placing.loads(views, ["p-0", "p-0", "p-1", None, "gone-7"], {"p-1": 42}, replicas=2)
    assert [(c.name, c.adapters, c.cache_bytes) for c in result] == [("p-0", 2, 0), ("p-1", 1, 42)]


def test_spread_of_ten_over_two_is_five_five() -> None:
    views = [placing.view_pod(pod(f"p-{i}"), "p") for i in range(2)]
    placed: list[str] = []
    for _ in range(10):
        chosen = placing.choose_pod(placing.loads(views, placed, {}, 2), 64)
        assert chosen is not None
        placed.append(chosen.name)
    assert placed.count("p-0") == 5 and placed.count("p-1") == 5


def test_decide_sticky_and_replacement() -> None:
    ready = placing.view_pod(pod("p-0"), "p")
    assert placing.decide({}, None, now=NOW, grace=GRACE)[0] is Move.PLACE
    assert placing.decide({"pod": "p-0", "podUID": "u1"}, ready, now=NOW, grace=GRACE)[0] is Move.KEEP
    assert placing.decide({"pod": "p-0"}, None, now=NOW, grace=GRACE)[0] is Move.REPLACE
    move, reason = placing.decide({"pod": "p-0", "podUID": "old"}, ready, now=NOW, grace=GRACE)
    assert move is Move.REPLACE and "new pod" in reason
    failed = placing.view_pod(pod("p-0", phase="Failed"), "p")
    assert placing.decide({"pod": "p-0"}, failed, now=NOW, grace=GRACE)[0] is Move.REPLACE


def test_decide_waits_out_the_grace_period() -> None:
    recent = placing.view_pod(pod("p-0", ready=False, since="2026-01-01T11:59:30Z"), "p")
    assert placing.decide({"pod": "p-0"}, recent, now=NOW, grace=GRACE)[0] is Move.WAIT
    old = placing.view_pod(pod("p-0", ready=False, since="2026-01-01T11:58:00Z"), "p")
    assert placing.decide({"pod": "p-0"}, old, now=NOW, grace=GRACE)[0] is Move.REPLACE
    # Without a transition time, the operator's own first sighting counts.
    bare = placing.view_pod(pod("p-0", ready=False), "p")
    seen = NOW - datetime.timedelta(seconds=61)
    assert placing.decide({"pod": "p-0"}, bare, now=NOW, grace=GRACE, unready_since=seen)[0] is Move.REPLACE
    assert placing.decide({"pod": "p-0"}, bare, now=NOW, grace=GRACE)[0] is Move.WAIT
