"""The operator's side of publishing: which pods are a pool's servers, what each trainer is told,
and the Served condition and Events an adapter shows (pure functions, plain dicts)."""

from __future__ import annotations

import datetime

import pytest
from tests.operator.harness import adapter_state

from lorafleet_api import selectors, wire
from lorafleet_operator import outcomes, publishing
from lorafleet_operator.outcomes import Polled, Publication

NOW = datetime.datetime(2026, 11, 29, 12, 0, tzinfo=datetime.UTC)


def _pod(name: str, labels: dict[str, str], ip: str | None = "10.0.0.5", ready: bool = True) -> dict:
    return {
        "metadata": {"name": name, "uid": name + "-uid", "labels": labels},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def test_a_selector_becomes_the_list_calls_string_form() -> None:
    selector = {
        "matchLabels": {"app": "vllm", "tier": "serve"},
        "matchExpressions": [
            {"key": "zone", "operator": "In", "values": ["a", "b"]},
            {"key": "canary", "operator": "DoesNotExist"},
            {"key": "gpu", "operator": "Exists"},
        ],
    }
    assert selectors.selector_string(selector) == "app=vllm,tier=serve,zone in (a,b),!canary,gpu"


@pytest.mark.parametrize(
    ("selector", "named"),
    [
        ({}, "selects nothing"),
        ({"matchExpressions": [{"key": "a", "operator": "Near", "values": ["x"]}]}, "Near"),
        ({"matchExpressions": [{"operator": "Exists"}]}, "no key"),
    ],
)
def test_a_selector_that_cannot_select_is_refused_naming_why(selector: dict, named: str) -> None:
    with pytest.raises(selectors.SelectorError, match=named):
        selectors.selector_string(selector)


def test_matching_follows_labels_and_expressions() -> None:
    selector = {
        "matchLabels": {"app": "vllm"},
        "matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["c"]}],
    }
    assert selectors.matches(selector, {"app": "vllm"})
    assert selectors.matches(selector, {"app": "vllm", "zone": "a"})
    assert not selectors.matches(selector, {"app": "vllm", "zone": "c"})
    assert not selectors.matches(selector, {"app": "other"})


def test_only_ready_servers_with_an_address_are_published_to() -> None:
    pods = [
        _pod("vllm-b", {"app": "vllm"}, ip="10.0.0.7"),
        _pod("vllm-a", {"app": "vllm"}),
        _pod("vllm-starting", {"app": "vllm"}, ready=False),
        _pod("vllm-no-ip", {"app": "vllm"}, ip=None),
    ]
    assert publishing.servers(pods, 8000) == [
        wire.ServerRef(name="vllm-a", url="http://10.0.0.5:8000"),
        wire.ServerRef(name="vllm-b", url="http://10.0.0.7:8000"),
    ]


def test_a_trainer_is_told_the_adapters_placed_on_it_with_their_served_names() -> None:
    def adapter(name: str, pod: str, serving: dict | None = None, deleting: bool = False) -> dict:
        meta = {"namespace": "team-a", "name": name}
        if deleting:
            meta["deletionTimestamp"] = "2026-11-29T12:00:00Z"
        spec = {"pool": "demo", **({"serving": serving} if serving else {})}
        return {"metadata": meta, "spec": spec, "status": {"pod": pod}}

    bodies = [
        adapter("alice", "demo-0"),
        adapter("bob", "demo-0", {"name": "bob-v2"}),
        adapter("carol", "demo-1"),
        adapter("dave", "demo-0", deleting=True),
    ]
    assert publishing.owned(bodies, "demo-0") == [
        wire.OwnedAdapter(namespace="team-a", name="alice", served_name="alice"),
        wire.OwnedAdapter(namespace="team-a", name="bob", served_name="bob-v2"),
    ]


def _named(name: str, served: str | None, created: str, deleting: bool = False) -> dict:
    meta = {"namespace": "team-a", "name": name, "creationTimestamp": created}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-29T13:00:00Z"
    spec = {"pool": "demo", **({"serving": {"name": served}} if served else {})}
    return {"metadata": meta, "spec": spec, "status": {"pod": "demo-0"}}


def test_a_served_name_is_held_by_the_oldest_adapter_of_the_namespace() -> None:
    bodies = [
        _named("zed", "shared", "2026-11-29T10:00:00Z"),
        _named("amy", "shared", "2026-11-29T11:00:00Z"),
        _named("bob", "zed", "2026-11-29T11:30:00Z"),  # the name zed is served under by default
        _named("cat", None, "2026-11-29T09:00:00Z"),
        _named("dan", "cat", "2026-11-29T12:00:00Z", deleting=True),  # going: holds nothing
    ]
    taken = publishing.names_taken(bodies)
    assert taken == {"amy": "zed"}  # the oldest holds a name, whatever the names' order
    assert [a.name for a in publishing.owned(bodies, "demo-0", taken)] == ["zed", "bob", "cat"]
    # Once the holder is going, the name passes to the next oldest.
    going = [_named("zed", "shared", "2026-11-29T10:00:00Z", deleting=True), *bodies[1:]]
    assert publishing.names_taken(going) == {}


def test_an_adapter_whose_name_is_taken_says_so_once() -> None:
    taken = outcomes.NameTaken("shared", "zed")
    outcome = outcomes.polled({"version": 2}, "demo-0", adapter_state(2, cached=True), taken)
    status = outcomes.adapter_status({"version": 2}, outcome, now=NOW, generation=1)
    (served,) = [c for c in status["conditions"] if c["type"] == "Served"]
    assert (served["status"], served["reason"]) == ("False", "ServedNameTaken")
    assert "'shared' is held by adapter zed" in served["message"]
    event = outcomes.announcement(outcome, {})
    assert event is not None and event.warning and event.reason == "ServedNameTaken"
    assert outcomes.announcement(outcome, status) is None
    # Published after all (the holder went): the trainer's report wins.
    published = adapter_state(2, cached=True, served_name="shared", served=[])
    assert outcomes.polled({}, "demo-0", published, taken).taken is None  # type: ignore[union-attr]


def test_trainer_pods_are_never_taken_for_servers() -> None:
    from lorafleet_operator.runtime import Runtime

    rt = Runtime.__new__(Runtime)
    rt.serving_selectors = {("team-a", "demo"): {"matchLabels": {"app": "vllm"}}}
    assert publishing.pools_selecting(rt, "team-a", {"app": "vllm"}) == ["demo"]
    assert publishing.pools_selecting(rt, "team-b", {"app": "vllm"}) == []
    assert publishing.pools_selecting(rt, "team-a", {"app": "vllm", "lorafleet.io/pool": "demo"}) == []


def _served(*servers: dict) -> Publication:
    return Publication(
        "alice",
        4,
        tuple(wire.ServedVersion.model_validate({"error": None, "since": None, **s}) for s in servers),
    )


@pytest.mark.parametrize(
    ("servers", "status", "reason"),
    [
        ((), False, "NoServers"),
        (({"server": "v0", "version": 4}, {"server": "v1", "version": 4}), True, "Served"),
        (({"server": "v0", "version": 4}, {"server": "v1", "version": 3}), False, "Publishing"),
        (({"server": "v0", "version": None, "error": "rank 32 > 16"},), False, "PublishFailed"),
    ],
)
def test_the_served_condition(servers: tuple, status: bool, reason: str) -> None:
    condition = outcomes.served_condition(_served(*servers))
    assert (condition.status, condition.reason) == (status, reason)


def test_polled_publishing_fills_the_status_and_its_condition() -> None:
    served = wire.ServedVersion(server="v0", version=4, error=None, since="2026-11-29T12:00:00Z")
    state = adapter_state(4, cached=True, served_name="alice", served=[served])
    outcome = outcomes.polled({"version": 3}, "demo-0", state)
    status = outcomes.adapter_status({"version": 3}, outcome, now=NOW, generation=1)
    assert status["artifact"] == "team-a/.alice.v00000004"
    assert status["servedName"] == "alice"
    assert status["served"] == [{"server": "v0", "version": 4, "since": "2026-11-29T12:00:00Z"}]
    (served,) = [c for c in status["conditions"] if c["type"] == "Served"]
    assert served["status"] == "True"
    # A trainer that does not publish the adapter leaves the serving fields alone.
    plain = outcomes.polled({}, "demo-0", adapter_state(4, cached=True))
    assert "servedName" not in outcomes.adapter_status({}, plain, now=NOW, generation=1)


def test_events_mark_a_failure_once_and_the_recovery() -> None:
    failing = Polled(4, True, None, _served({"server": "v0", "version": 3, "error": "refused"}))
    first = outcomes.announcement(failing, {})
    assert first is not None and first.reason == "PublishFailed" and first.warning
    stored = outcomes.adapter_status({}, failing, now=NOW, generation=1)
    assert outcomes.announcement(failing, stored) is None  # the same failure again: no new Event
    recovered = Polled(4, True, None, _served({"server": "v0", "version": 4}))
    event = outcomes.announcement(recovered, stored)
    assert event is not None and event.reason == "Served" and not event.warning
    gone = Polled(4, True, None, _served())
    served_status = outcomes.adapter_status({}, recovered, now=NOW, generation=1)
    event = outcomes.announcement(gone, served_status)
    assert event is not None and event.reason == "NoServers" and event.warning
