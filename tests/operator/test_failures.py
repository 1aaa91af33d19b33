"""No silent failure: every error path that the operator retries or skips is logged and counted.

One test per ``path`` of ``lorafleet_operator_reconcile_errors_total``. Each calls the handler's
function with a runtime whose Kubernetes and trainer clients fail where the test says (stand-ins
of the two clients: this is a unit test of the error handling, not of the clients), then checks
the counter by path and the WARNING line (the object and the cause) for a skipped error, or
kopf's TemporaryError for a retried one.
"""

from __future__ import annotations

import datetime
import logging
import re
from pathlib import Path
from typing import Any, cast

import kopf
import pytest
from prometheus_client import CollectorRegistry
from tests.operator.harness import adapter_state

import lorafleet_operator as operator_package
from lorafleet_api import wire
from lorafleet_operator import handlers, pooling
from lorafleet_operator.kube import ApiError, KubeApi
from lorafleet_operator.metrics import ERROR_PATHS, OperatorMetrics
from lorafleet_operator.runtime import Runtime
from lorafleet_operator.settings import OperatorSettings
from lorafleet_operator.trainers import TrainerClient, TrainerError, TrainerUnreachable

NS = "team-a"
POOL = {"metadata": {"namespace": NS, "name": "p", "generation": 1}, "spec": {"baseModel": "builtin:tiny"}}
POD = {
    "metadata": {"namespace": NS, "name": "p-0", "uid": "u0", "labels": {"lorafleet.io/pool": "p"}},
    "status": {"phase": "Running", "podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
}
READY = {
    "phase": "Ready",
    "pod": "p-0",
    "podUID": "u0",
    "endpoint": "http://10.0.0.1:8080",
    "epoch": 1,
    "observedGeneration": 1,
    "version": 3,
}


def adapter(status: dict[str, Any] | None = None, pool: str = "p") -> dict[str, Any]:
    meta = {"namespace": NS, "name": "alice", "uid": "ua", "generation": 1}
    return {"metadata": meta, "spec": {"pool": pool}, "status": dict(status or {})}


class Kube:
    """The KubeApi calls the reconcilers make, over a few objects; ``fail`` names the calls that
    raise and what."""

    def __init__(self) -> None:
        self.pool: dict[str, Any] | None = POOL
        self.pods: list[dict[str, Any]] = [POD]
        self.adapters: list[dict[str, Any]] = []
        self.fail: dict[str, Exception] = {}
        self.patches: list[dict[str, Any]] = []

    def _check(self, call: str) -> None:
        if call in self.fail:
            raise self.fail[call]

    async def get_pool(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._check("get_pool")
        return self.pool

    async def list_pool_pods(self, namespace: str, pool: str) -> list[dict[str, Any]]:
        self._check("list_pool_pods")
        return self.pods

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._check("get_pod")
        return next((p for p in self.pods if p["metadata"]["name"] == name), None)

    async def create_pod(self, pod: dict[str, Any]) -> bool:
        return False

    async def create_service(self, service: dict[str, Any]) -> bool:
        return False

    async def delete_pod(self, namespace: str, name: str) -> bool:
        return True

    async def list_pool_adapters(self, namespace: str, pool: str) -> list[dict[str, Any]]:
        self._check("list_pool_adapters")
        return self.adapters

    async def list_adapters(self, namespace: str) -> list[dict[str, Any]]:
        self._check("list_adapters")
        return self.adapters

    async def get_adapter(self, namespace: str, name: str) -> dict[str, Any] | None:
        return next((a for a in self.adapters if a["metadata"]["name"] == name), None)

    async def patch_adapter_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self._check("patch_adapter_status")
        self.patches.append(status)

    async def patch_pool_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self._check("patch_pool_status")


class Trainers:
    """The TrainerClient calls; ``fail`` names the calls that raise and what."""

    def __init__(self) -> None:
        self.fail: dict[str, Exception] = {}

    def _check(self, call: str) -> None:
        if call in self.fail:
            raise self.fail[call]

    async def init(self, base: str, namespace: str, name: str, body: wire.InitRequest) -> int:
        self._check("init")
        return 200

    async def state(self, base: str, namespace: str, name: str) -> wire.AdapterState | None:
        self._check("state")
        return adapter_state(
            3, cached=True, namespace=namespace, name=name, artifact=f"{namespace}/.{name}.v00000003"
        )

    async def evict(self, base: str, namespace: str, name: str) -> bool:
        self._check("evict")
        return True

    async def unpublish(self, base: str, namespace: str, name: str) -> dict[str, str]:
        self._check("unpublish")
        return {}

    async def cache(self, base: str) -> wire.CacheState:
        self._check("cache")
        return wire.CacheState(capacity_bytes=10**9, used_bytes=0, entries=[])


@pytest.fixture
def kube() -> Kube:
    return Kube()


@pytest.fixture
def trainers() -> Trainers:
    return Trainers()


@pytest.fixture
def rt(kube: Kube, trainers: Trainers) -> Runtime:
    metrics = OperatorMetrics(CollectorRegistry())
    settings = OperatorSettings(trainer_port=8080, leader_election=False, eviction_timeout_seconds=60)
    return Runtime(settings, cast(KubeApi, kube), cast(TrainerClient, trainers), metrics)


def errors(rt: Runtime) -> dict[str, float]:
    """The non-zero counts of reconcile_errors_total by path."""
    counts = {p: rt.metrics.reconcile_errors.labels(path=p)._value.get() for p in ERROR_PATHS}
    return {p: n for p, n in counts.items() if n}


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


FORBIDDEN = ApiError(403, "GET /apis/lorafleet.io/v1alpha1/...: forbidden")


def test_every_path_is_exported_at_zero(rt: Runtime) -> None:
    assert errors(rt) == {}
    names = {s.labels["path"] for m in rt.metrics.registry.collect() for s in m.samples if "path" in s.labels}
    assert names == set(ERROR_PATHS)


def test_every_path_the_operator_counts_is_a_known_one() -> None:
    """A path named in a skipped()/retried() call but missing from ERROR_PATHS would raise where
    the error was to be counted (serving_sync and server_event once were)."""
    source = Path(operator_package.__file__).parent
    used = {
        path
        for module in source.glob("*.py")
        for path in re.findall(
            r"failures\.(?:skipped|retried)\(\s*rt\.metrics,\s*\"(\w+)\"", module.read_text()
        )
    }
    assert used and used <= set(ERROR_PATHS), used - set(ERROR_PATHS)


async def test_pool_change_is_retried_by_kopf_and_counted(
    rt: Runtime, kube: Kube, caplog: pytest.LogCaptureFixture
) -> None:
    kube.fail["get_pool"] = FORBIDDEN
    with pytest.raises(kopf.TemporaryError, match="403"):
        await handlers.change_pool(rt, NS, "p", retry=0)
    assert errors(rt) == {"pool_change": 1}
    assert warnings(caplog) == []  # kopf logs the TemporaryError itself, once


async def test_pool_resync_failure_is_logged_and_counted(
    rt: Runtime, kube: Kube, caplog: pytest.LogCaptureFixture
) -> None:
    kube.fail["get_pool"] = FORBIDDEN
    await handlers.resync_pool(rt, NS, "p")
    assert errors(rt) == {"pool_resync": 1}
    (line,) = warnings(caplog)
    assert "trainerpool team-a/p" in line and "403" in line and "forbidden" in line


async def test_a_trainer_cache_report_that_fails_is_logged_and_counted(
    rt: Runtime, trainers: Trainers, caplog: pytest.LogCaptureFixture
) -> None:
    trainers.fail["cache"] = TrainerUnreachable("GET http://10.0.0.1:8080/v1/cache: ConnectError")
    await pooling.sync_pool(rt, NS, "p")
    assert errors(rt) == {"pool_cache_report": 1}
    (line,) = warnings(caplog)
    assert "pod team-a/p-0" in line and "ConnectError" in line


async def test_pod_event_pool_sync_failure_is_logged_and_counted(
    rt: Runtime, kube: Kube, caplog: pytest.LogCaptureFixture
) -> None:
    kube.fail["list_pool_pods"] = ApiError(503, "GET /api/v1/namespaces/team-a/pods: unavailable")
    await handlers.pod_changed(rt, NS, "p", "p-0")
    assert errors(rt) == {"pod_event": 1}
    (line,) = warnings(caplog)
    assert "pod team-a/p-0 of trainerpool p" in line and "503" in line


async def test_pod_event_adapter_failure_is_logged_and_counted(
    rt: Runtime, kube: Kube, trainers: Trainers, caplog: pytest.LogCaptureFixture
) -> None:
    # The pod event finds an adapter that was never initialised there; its init cannot reach the trainer.
    kube.adapters = [adapter({**READY, "phase": "Placed", "observedGeneration": None})]
    trainers.fail["init"] = TrainerUnreachable("PUT http://10.0.0.1:8080/v1/adapters/team-a/alice: timeout")
    await handlers.pod_changed(rt, NS, "p", "p-0")
    assert errors(rt) == {"pod_event_adapter": 1}
    (line,) = warnings(caplog)
    assert "loraadapter team-a/alice" in line and "timeout" in line
    assert kube.patches[-1]["conditions"][0]["reason"] == "TrainerUnavailable"


async def test_a_pending_adapter_is_waiting_not_failing(
    rt: Runtime, kube: Kube, caplog: pytest.LogCaptureFixture
) -> None:
    kube.pool = None
    kube.adapters = [adapter()]
    await handlers.pod_changed(rt, NS, "p", "p-0")
    with pytest.raises(kopf.TemporaryError, match="PoolNotFound"):
        await handlers.change_adapter(rt, NS, "alice", adapter(), retry=0)
    await handlers.resync_adapter(rt, NS, "alice", adapter())
    assert errors(rt) == {} and warnings(caplog) == []
    assert kube.patches[-1]["phase"] == "Pending"  # its status says what it waits for


async def test_adapter_change_errors_are_retried_by_kopf_and_counted(
    rt: Runtime, kube: Kube, trainers: Trainers
) -> None:
    kube.fail["list_pool_pods"] = FORBIDDEN
    with pytest.raises(kopf.TemporaryError, match="403"):
        await handlers.change_adapter(rt, NS, "alice", adapter(), retry=0)
    del kube.fail["list_pool_pods"]
    trainers.fail["init"] = TrainerError(500, "PUT ...: boom")
    placed = adapter({**READY, "phase": "Placed", "observedGeneration": None})
    kube.adapters = [placed]
    with pytest.raises(kopf.TemporaryError, match="boom"):
        await handlers.change_adapter(rt, NS, "alice", placed, retry=0)
    assert errors(rt) == {"adapter_change": 2}


async def test_adapter_resync_failure_is_logged_and_counted(
    rt: Runtime, kube: Kube, caplog: pytest.LogCaptureFixture
) -> None:
    kube.fail["list_pool_pods"] = FORBIDDEN
    await handlers.resync_adapter(rt, NS, "alice", adapter(READY))
    assert errors(rt) == {"adapter_resync": 1}
    (line,) = warnings(caplog)
    assert "loraadapter team-a/alice" in line and "403" in line


async def test_a_failed_trainer_poll_is_logged_and_counted(
    rt: Runtime, kube: Kube, trainers: Trainers, caplog: pytest.LogCaptureFixture
) -> None:
    trainers.fail["state"] = TrainerError(503, "GET http://10.0.0.1:8080/v1/adapters/team-a/alice: not ready")
    await handlers.resync_adapter(rt, NS, "alice", adapter(READY))
    assert errors(rt) == {"adapter_poll": 1}
    (line,) = warnings(caplog)
    assert "loraadapter team-a/alice" in line and "not ready" in line
    assert kube.patches == []  # nothing is written from a poll that failed


async def test_adapter_delete_errors_are_retried_by_kopf_and_counted(
    rt: Runtime, kube: Kube, trainers: Trainers
) -> None:
    trainers.fail["evict"] = TrainerUnreachable("DELETE ...: refused")
    with pytest.raises(kopf.TemporaryError, match="refused"):
        await handlers.delete_adapter(rt, adapter({**READY, "phase": "Terminating"}), datetime.timedelta(0))
    kube.fail["get_pod"] = FORBIDDEN
    with pytest.raises(kopf.TemporaryError, match="403"):
        await handlers.delete_adapter(rt, adapter({**READY, "phase": "Terminating"}), datetime.timedelta(0))
    assert errors(rt) == {"adapter_delete": 2}


async def test_a_failed_terminating_write_is_logged_counted_and_does_not_stop_the_eviction(
    rt: Runtime, kube: Kube, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    kube.fail["patch_adapter_status"] = FORBIDDEN
    posted: list[tuple[str, str]] = []
    monkeypatch.setattr(kopf, "event", lambda body, *, type, reason, message: posted.append((type, reason)))
    await handlers.delete_adapter(rt, adapter(READY), datetime.timedelta(0))
    assert errors(rt) == {"adapter_terminating": 1}
    (line,) = warnings(caplog)
    assert "loraadapter team-a/alice" in line and "403" in line
    assert posted == [("Normal", "Evicted")]
