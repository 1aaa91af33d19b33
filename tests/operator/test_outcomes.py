"""Adapter status: what each reconcile outcome writes and announces, from plain dicts."""

from __future__ import annotations

import datetime
from typing import Any

from tests.operator.harness import adapter_state

from lorafleet_operator import outcomes
from lorafleet_operator.outcomes import WEIGHTS

T0 = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(minutes=5)
PLACED = {"phase": "Placed", "pod": "p-1", "epoch": 2, "endpoint": "http://10.0.0.1:8080"}


def status(stored: dict[str, Any], outcome: outcomes.Outcome, now: datetime.datetime = T0) -> dict[str, Any]:
    """The stored status after ``outcome``, as the API server would hold it after the patch."""
    return {**stored, **outcomes.adapter_status(stored, outcome, now=now, generation=3)}


def conditions(found: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    return {c["type"]: (c["status"], c["reason"], c["message"]) for c in found["conditions"]}


def test_first_init_is_ready_and_its_weights_were_created() -> None:
    first = {**PLACED, "epoch": 1}
    outcome = outcomes.initialized(first, "p-1", 1, 201)
    assert outcome == outcomes.Initialized("p-1", 1, 201)
    found = status(first, outcome)
    assert (found["phase"], found["observedGeneration"]) == ("Ready", 3)
    assert "version" not in found and "lostVersion" not in found
    got = conditions(found)
    assert got["Initialized"] == ("True", "Created", "trainer answered 201 for epoch 1")
    assert got["Ready"] == ("True", "Initialized", "ready on pod p-1")
    assert got[WEIGHTS][:2] == ("True", "Created")
    assert outcomes.announcement(outcome) is None


def test_replacement_that_finds_the_stored_weights_keeps_the_version() -> None:
    before = {**PLACED, "observedGeneration": 3, "version": 7}
    outcome = outcomes.initialized(before, "p-1", 2, 200)
    found = status(before, outcome)
    assert found["version"] == 7 and conditions(found)[WEIGHTS][:2] == ("True", "Found")


def test_replacement_onto_a_pod_without_the_weights_shows_the_loss() -> None:
    before = {**PLACED, "observedGeneration": 3, "version": 7}
    outcome = outcomes.initialized(before, "p-1", 2, 201)
    assert outcome == outcomes.StorageLost("p-1", 2, 7)
    found = status(before, outcome)
    assert (found["phase"], found["version"], found["lostVersion"]) == ("Ready", 0, 7)
    weights = conditions(found)[WEIGHTS]
    assert weights[:2] == ("False", "StorageLost")
    assert "restarted from version 0" in weights[2] and "version 7 is lost" in weights[2]
    event = outcomes.announcement(outcome)
    assert event is not None and (event.reason, event.warning) == ("StorageLost", True)
    assert event.message.startswith("Pod p-1 had no stored weights")
    # A later init that finds the restarted weights does not hide the loss.
    again = status(found, outcomes.initialized(found, "p-1", 2, 200), now=T1)
    assert conditions(again)[WEIGHTS][:2] == ("False", "StorageLost")


def test_a_loss_before_any_version_was_seen_still_shows() -> None:
    before = {**PLACED, "observedGeneration": 3}  # Ready once, never polled
    outcome = outcomes.initialized(before, "p-1", 2, 201)
    assert outcome == outcomes.StorageLost("p-1", 2, None)
    found = status(before, outcome)
    assert found["version"] == 0 and "lostVersion" not in found
    assert "an earlier version is lost" in conditions(found)[WEIGHTS][2]


def test_a_version_that_went_back_shows_the_loss() -> None:
    ready = {"phase": "Ready", "pod": "p-0", "version": 9, "conditions": []}
    outcome = outcomes.polled(ready, "p-0", adapter_state(4, cached=True))
    assert outcome == outcomes.VersionWentBack("p-0", 4, 9, True)
    found = status(ready, outcome)
    assert (found["version"], found["lostVersion"], found["cached"]) == (4, 9, True)
    assert conditions(found)[WEIGHTS][:2] == ("False", "VersionWentBack")
    event = outcomes.announcement(outcome)
    assert event is not None and event.warning and "below version 9" in event.message


def test_polling_records_the_version_and_when_it_last_grew() -> None:
    ready = {"phase": "Ready", "version": 1}
    assert outcomes.adapter_status(ready, outcomes.Polled(1, True), now=T0, generation=3) == {
        "version": 1,
        "cached": True,
    }
    grown = outcomes.adapter_status(ready, outcomes.Polled(2, False), now=T0, generation=3)
    assert grown == {"version": 2, "cached": False, "lastStepTime": "2026-01-01T12:00:00Z"}
    # The first report sets the version without claiming a step was seen.
    assert "lastStepTime" not in outcomes.adapter_status({}, outcomes.Polled(0, True), now=T0, generation=3)


def test_pending_and_not_ready_say_why() -> None:
    found = status({}, outcomes.Pending("NoReadyPod", "TrainerPool p has no Ready pod"))
    assert found["phase"] == "Pending"
    got = conditions(found)
    assert got["Placed"] == got["Ready"] == ("False", "NoReadyPod", "TrainerPool p has no Ready pod")
    waiting = status({"phase": "Ready"}, outcomes.PodNotReady("pod p-0 is not Ready"))
    assert waiting["phase"] == "Ready" and conditions(waiting)["Ready"][:2] == ("False", "PodNotReady")


def test_placement_is_written_and_announced() -> None:
    first = outcomes.Placed("p-0", "u0", "http://10.0.0.0:8080", 1)
    found = status({}, first)
    assert {k: found[k] for k in ("phase", "pod", "podUID", "endpoint", "epoch", "cached")} == {
        "phase": "Placed",
        "pod": "p-0",
        "podUID": "u0",
        "endpoint": "http://10.0.0.0:8080",
        "epoch": 1,
        "cached": False,
    }
    assert conditions(found)["Placed"] == ("True", "Placed", "on pod p-0, epoch 1")
    assert outcomes.announcement(first) == outcomes.Announcement("Placed", "Placed on pod p-0 with epoch 1")
    moved = outcomes.Placed("p-1", "u1", "http://10.0.0.1:8080", 2, moved_because="pod p-0 is gone")
    event = outcomes.announcement(moved)
    assert event == outcomes.Announcement(
        "Rescheduled", "Moved to pod p-1 with epoch 2: pod p-0 is gone", warning=True
    )


def test_refusals_and_unreachable_trainers() -> None:
    rejected = status(PLACED, outcomes.InitRejected("409: lora: differs"))
    assert rejected["phase"] == "Failed"
    assert conditions(rejected)["Initialized"] == ("False", "InitRejected", "409: lora: differs")
    assert outcomes.announcement(outcomes.InitRejected("x")) == outcomes.Announcement(
        "InitRejected", "x", warning=True
    )
    down = status(PLACED, outcomes.TrainerUnavailable("p-1", "connection refused"))
    assert down["phase"] == "Placed"
    assert conditions(down)["Initialized"] == ("False", "TrainerUnavailable", "connection refused")
    invalid = status({}, outcomes.InvalidSpec("rank: too big"))
    assert invalid["phase"] == "Failed" and conditions(invalid)["Placed"][1] == "InvalidSpec"


def test_epoch_advanced_takes_over_the_retained_adapter() -> None:
    outcome = outcomes.EpochAdvanced("p-0", 3)
    found = status({**PLACED, "epoch": 1}, outcome)
    assert found["epoch"] == 4
    assert conditions(found)["Placed"][:2] == ("True", "EpochAdvanced")
    event = outcomes.announcement(outcome)
    assert event is not None and "epoch 3" in event.message and not event.warning


def test_an_unchanged_outcome_changes_nothing_and_keeps_transition_times() -> None:
    first = status({}, outcomes.Pending("NoReadyPod", "none"))
    desired = outcomes.adapter_status(first, outcomes.Pending("NoReadyPod", "none"), now=T1, generation=3)
    assert all(first.get(k) == v for k, v in desired.items())
