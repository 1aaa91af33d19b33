"""What one step of an adapter's reconcile came to, and the status and Event each outcome gives.

The reconciler (``adapting``) acts, then names what happened as one of the outcomes below; two pure
functions turn an outcome into the status fields to patch (``adapter_status``) and the Kubernetes
Event to post (``announcement``). Every status an adapter can show is written here once, with typed
conditions, and is tested with plain dicts.

An adapter's trained state lives in its pool's adapter store. When a trainer creates an adapter
that a trainer had held before (the init answers 201 for an adapter that was Ready once), or
reports a version below one seen before, that state is gone: the ``WeightsStored`` condition turns
False, ``status.version`` shows the restart and ``status.lostVersion`` the last version seen, and
a Warning Event says so. Nothing else would: the adapter is Ready and trains on from version 0.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from typing import Any

from lorafleet_api import wire
from lorafleet_operator.statuses import Condition, set_conditions, timestamp

# Whether the adapter's trained state survived its placements (see the module docstring).
WEIGHTS = "WeightsStored"
# Whether every inference server of the pool serves the adapter's latest version.
SERVED = "Served"


@dataclasses.dataclass(frozen=True)
class InvalidSpec:
    """The spec does not parse (an object stored before the CRD had today's limits)."""

    error: str


@dataclasses.dataclass(frozen=True)
class PodNotReady:
    """Its pod is not Ready, within the grace period: the adapter stays where its cache is."""

    reason: str


@dataclasses.dataclass(frozen=True)
class Pending:
    """No pod can take the adapter now; ``reason`` is PoolNotFound, PoolFull or NoReadyPod."""

    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Placed:
    """The adapter was given a pod (written before its init); ``moved_because`` says why it left
    its previous pod, None for a first placement."""

    pod: str
    uid: str | None
    endpoint: str
    epoch: int
    moved_because: str | None = None


@dataclasses.dataclass(frozen=True)
class EpochAdvanced:
    """The store holds the adapter at a newer epoch (an earlier object of the same name, deleted
    with ``deletionPolicy: Retain``): this object takes it over with the epoch after it."""

    pod: str
    stored_epoch: int

    @property
    def epoch(self) -> int:
        return self.stored_epoch + 1


@dataclasses.dataclass(frozen=True)
class Initialized:
    """The trainer answered ``code`` (201 created, 200 found) to the init for ``epoch``."""

    pod: str
    epoch: int
    code: int


@dataclasses.dataclass(frozen=True)
class StorageLost:
    """The init created an adapter that a trainer had held before: its stored weights are gone
    and training restarts from version 0. ``last_version``: the last version seen, if any."""

    pod: str
    epoch: int
    last_version: int | None


@dataclasses.dataclass(frozen=True)
class InitRejected:
    """The trainer refused the config (409/422): retrying cannot help."""

    message: str


@dataclasses.dataclass(frozen=True)
class TrainerUnavailable:
    """The init could not reach the trainer or it failed; the reconcile is retried."""

    pod: str
    message: str


@dataclasses.dataclass(frozen=True)
class Publication:
    """What the trainer reports of the adapter's publishing: its served name and, per inference
    server, the version served and the last error (``servers`` empty: no server is selected)."""

    name: str
    version: int  # the committed version every server should serve
    servers: tuple[wire.ServedVersion, ...]


@dataclasses.dataclass(frozen=True)
class NameTaken:
    """The adapter's served name is held by an older adapter of its namespace (``holder``)."""

    name: str
    holder: str

    def condition(self) -> Condition:
        return Condition(
            SERVED,
            False,
            "ServedNameTaken",
            f"served name {self.name!r} is held by adapter {self.holder}; this adapter is not "
            "published until the name is free (or spec.serving.name names another)",
        )


@dataclasses.dataclass(frozen=True)
class Polled:
    """The trainer's report of a Ready adapter: its version, whether it is cached, and its
    publishing (None when the trainer does not publish it; ``taken`` says when that is because
    another adapter holds its served name)."""

    version: int | None
    cached: bool
    artifact: str | None = None
    served: Publication | None = None
    taken: NameTaken | None = None


@dataclasses.dataclass(frozen=True)
class VersionWentBack:
    """The trainer reports a version below the last one seen: the stored weights went back."""

    pod: str
    version: int
    last_version: int
    cached: bool


Outcome = (
    InvalidSpec
    | PodNotReady
    | Pending
    | Placed
    | EpochAdvanced
    | Initialized
    | StorageLost
    | InitRejected
    | TrainerUnavailable
    | Polled
    | VersionWentBack
)


@dataclasses.dataclass(frozen=True)
class Announcement:
    """A Kubernetes Event to post on the adapter."""

    reason: str
    message: str
    warning: bool = False


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def was_initialized(status: Mapping[str, Any]) -> bool:
    """Whether a trainer ever held this adapter: it was Ready once, or a version was reported."""
    return status.get("observedGeneration") is not None or status.get("version") is not None


def initialized(status: Mapping[str, Any], pod: str, epoch: int, code: int) -> Initialized | StorageLost:
    """The outcome of an init the trainer answered with ``code``, given the stored ``status``."""
    if code == 201 and was_initialized(status):
        return StorageLost(pod, epoch, _int(status.get("version")))
    return Initialized(pod, epoch, code)


def polled(
    status: Mapping[str, Any], pod: str, state: wire.AdapterState, taken: NameTaken | None = None
) -> Polled | VersionWentBack:
    """The outcome of polling the trainer's ``state`` of a Ready adapter (``taken``: its served
    name is held by another adapter, so it is not published)."""
    last = _int(status.get("version"))
    if last is not None and state.version < last:
        return VersionWentBack(pod, state.version, last, state.cached)
    served = None
    if state.served_name:
        served = Publication(state.served_name, state.version, tuple(state.served))
    return Polled(state.version, state.cached, state.artifact or None, served, None if served else taken)


def served_condition(served: Publication) -> Condition:
    """``Served``: True when every selected server serves the committed version."""
    if not served.servers:
        return Condition(
            SERVED, False, "NoServers", "no Ready inference server is selected by the pool's spec.serving"
        )
    failing = [s for s in served.servers if s.error]
    if failing:
        text = "; ".join(f"{s.server}: {s.error}" for s in failing)
        return Condition(SERVED, False, "PublishFailed", f"version {served.version} not served on {text}")
    behind = [s for s in served.servers if s.version != served.version]
    if behind:
        text = ", ".join(f"{s.server} serves {s.version}" for s in behind)
        return Condition(SERVED, False, "Publishing", f"version {served.version} is being loaded: {text}")
    names = ", ".join(s.server for s in served.servers)
    return Condition(SERVED, True, "Served", f"version {served.version} as {served.name!r} on {names}")


def _lost_message(outcome: StorageLost) -> str:
    seen = f"version {outcome.last_version}" if outcome.last_version is not None else "an earlier version"
    return (
        f"pod {outcome.pod} had no stored weights for this adapter (epoch {outcome.epoch}): training "
        f"restarted from version 0; {seen} is lost"
    )


def _went_back_message(outcome: VersionWentBack) -> str:
    return (
        f"the trainer on pod {outcome.pod} reports version {outcome.version}, below version "
        f"{outcome.last_version} seen before: the stored weights went back"
    )


def _taken_over(outcome: EpochAdvanced) -> str:
    return f"the stored adapter was at epoch {outcome.stored_epoch}; taken over with epoch {outcome.epoch}"


def _served_event(served: Publication, stored: Mapping[str, Any]) -> Announcement | None:
    """A Warning when publishing starts failing (or fails differently), or when the servers that
    served the adapter are all gone; a Normal Event when it is served everywhere again."""
    condition = served_condition(served)
    before = next((c for c in stored.get("conditions") or [] if c.get("type") == SERVED), None)
    if before is None:
        return None if condition.reason != "PublishFailed" else _warning(condition)
    same = before.get("reason") == condition.reason and before.get("message") == condition.message
    if condition.reason == "PublishFailed" and not same:
        return _warning(condition)
    if condition.reason == "NoServers" and before.get("status") == "True":
        return _warning(condition)
    if condition.status and before.get("reason") in ("PublishFailed", "NoServers"):
        return Announcement("Served", _sentence(f"served again: {condition.message}"))
    return None


def _warning(condition: Condition) -> Announcement:
    return Announcement(condition.reason, _sentence(condition.message), warning=True)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _weights_lost(stored: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") == WEIGHTS and c.get("status") == "False" for c in stored.get("conditions") or []
    )


def _effect(
    stored: Mapping[str, Any], outcome: Outcome, now: datetime.datetime, generation: int | None
) -> tuple[dict[str, Any], list[Condition]]:
    """The status fields and the conditions ``outcome`` sets."""
    match outcome:
        case InvalidSpec():
            return {"phase": "Failed"}, [Condition("Placed", False, "InvalidSpec", outcome.error)]
        case PodNotReady():
            return {}, [Condition("Ready", False, "PodNotReady", outcome.reason)]
        case Pending():
            return {"phase": "Pending"}, [
                Condition("Placed", False, outcome.reason, outcome.message),
                Condition("Ready", False, outcome.reason, outcome.message),
            ]
        case Placed():
            fields = {
                "phase": "Placed",
                "pod": outcome.pod,
                "podUID": outcome.uid,
                "endpoint": outcome.endpoint,
                "epoch": outcome.epoch,
                "cached": False,
            }
            message = f"on pod {outcome.pod}, epoch {outcome.epoch}"
            return fields, [Condition("Placed", True, "Placed", message)]
        case EpochAdvanced():
            return {"epoch": outcome.epoch}, [
                Condition("Placed", True, "EpochAdvanced", _taken_over(outcome))
            ]
        case Initialized():
            created = outcome.code == 201
            conditions = [
                Condition(
                    "Initialized",
                    True,
                    "Created" if created else "Unchanged",
                    f"trainer answered {outcome.code} for epoch {outcome.epoch}",
                ),
                Condition("Ready", True, "Initialized", f"ready on pod {outcome.pod}"),
            ]
            # A loss stays shown until the adapter is created anew: finding the restarted weights
            # later does not undo it.
            if created or not _weights_lost(stored):
                reason, held = ("Created", "created") if created else ("Found", "holds")
                message = f"pod {outcome.pod} {held} the adapter's stored weights (epoch {outcome.epoch})"
                conditions.append(Condition(WEIGHTS, True, reason, message))
            return {"phase": "Ready", "observedGeneration": generation}, conditions
        case StorageLost():
            fields = {"phase": "Ready", "observedGeneration": generation, "version": 0}
            if outcome.last_version is not None:
                fields["lostVersion"] = outcome.last_version
            return fields, [
                Condition("Initialized", True, "Created", f"trainer answered 201 for epoch {outcome.epoch}"),
                Condition("Ready", True, "Initialized", f"ready on pod {outcome.pod}"),
                Condition(WEIGHTS, False, "StorageLost", _lost_message(outcome)),
            ]
        case InitRejected():
            return {"phase": "Failed"}, [Condition("Initialized", False, "InitRejected", outcome.message)]
        case TrainerUnavailable():
            return {}, [Condition("Initialized", False, "TrainerUnavailable", outcome.message)]
        case Polled():
            polled: dict[str, Any] = {"version": outcome.version, "cached": outcome.cached}
            if outcome.version != stored.get("version") and stored.get("version") is not None:
                polled["lastStepTime"] = timestamp(now)
            if outcome.artifact:
                polled["artifact"] = outcome.artifact
            if outcome.served is None:
                return polled, [outcome.taken.condition()] if outcome.taken is not None else []
            polled["servedName"] = outcome.served.name
            polled["served"] = [s.model_dump(exclude_none=True) for s in outcome.served.servers]
            return polled, [served_condition(outcome.served)]
        case VersionWentBack():
            fields = {
                "version": outcome.version,
                "cached": outcome.cached,
                "lostVersion": outcome.last_version,
            }
            return fields, [Condition(WEIGHTS, False, "VersionWentBack", _went_back_message(outcome))]


def adapter_status(
    stored: Mapping[str, Any], outcome: Outcome, *, now: datetime.datetime, generation: int | None
) -> dict[str, Any]:
    """The status fields to patch onto ``stored`` for ``outcome`` (conditions merged, each keeping
    its transition time while its status holds)."""
    fields, conditions = _effect(stored, outcome, now, generation)
    desired = dict(fields)
    if conditions:
        desired["conditions"] = set_conditions(
            stored.get("conditions") or [], conditions, now=now, generation=generation
        )
    return desired


def announcement(outcome: Outcome, stored: Mapping[str, Any] | None = None) -> Announcement | None:
    """The Event ``outcome`` deserves, if any; ``stored`` (the status before it) tells a change
    of publishing state from a repeat."""
    match outcome:
        case Polled(served=Publication() as served):
            return _served_event(served, stored or {})
        case Polled(taken=NameTaken() as taken):
            condition = taken.condition()
            before = [c for c in (stored or {}).get("conditions") or [] if c.get("type") == SERVED]
            if before and before[0].get("message") == condition.message:
                return None  # said already
            return _warning(condition)
        case Placed() if outcome.moved_because is not None:
            message = f"Moved to pod {outcome.pod} with epoch {outcome.epoch}: {outcome.moved_because}"
            return Announcement("Rescheduled", message, warning=True)
        case Placed():
            return Announcement("Placed", f"Placed on pod {outcome.pod} with epoch {outcome.epoch}")
        case EpochAdvanced():
            message = f"Resumed the retained adapter on pod {outcome.pod}: {_taken_over(outcome)}"
            return Announcement("EpochAdvanced", message)
        case InitRejected():
            return Announcement("InitRejected", outcome.message, warning=True)
        case StorageLost():
            return Announcement("StorageLost", _sentence(_lost_message(outcome)), warning=True)
        case VersionWentBack():
            return Announcement("VersionWentBack", _sentence(_went_back_message(outcome)), warning=True)
    return None
