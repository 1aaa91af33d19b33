"""Adapter planning: which step one reconcile pass takes, and which pod a placement goes to."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from lorafleet_api import pools
from lorafleet_operator import outcomes, placing, plans
from lorafleet_operator.placing import Move
from lorafleet_operator.plans import Observed, Step

T0 = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.UTC)
GRACE = datetime.timedelta(seconds=60)
READY = {"pod": "p-0", "podUID": "u0", "phase": "Ready", "observedGeneration": 2, "epoch": 1}


def pod(
    name: str, *, ready: bool = True, uid: str = "u0", changed: datetime.datetime | None = None
) -> placing.PodView:
    ordinal = int(name.rsplit("-", 1)[1])
    return placing.PodView(name, uid, ordinal, f"10.0.0.{ordinal}", ready, False, False, changed)


def observe(status: dict[str, Any], current: placing.PodView | None, **kw: Any) -> Observed:
    return Observed(status=status, generation=2, pod=current, now=T0, grace=GRACE, **kw)


def test_a_new_adapter_is_placed_under_the_lock_only() -> None:
    assert plans.plan_adapter(observe({}, None)).step is Step.LOCK
    plan = plans.plan_adapter(observe({}, None, locked=True))
    assert (plan.step, plan.move) == (Step.PLACE, Move.PLACE)


def test_a_ready_current_adapter_is_polled_on_resync_and_left_alone_otherwise() -> None:
    assert plans.plan_adapter(observe(READY, pod("p-0"))).step is Step.IDLE
    assert plans.plan_adapter(observe(READY, pod("p-0"), refresh=True)).step is Step.REFRESH
    # Polling needs no lock: the locked pass, when one runs, polls as well.
    assert plans.plan_adapter(observe(READY, pod("p-0"), refresh=True, locked=True)).step is Step.REFRESH


@pytest.mark.parametrize(
    "status",
    [{**READY, "phase": "Placed"}, {**READY, "observedGeneration": 1}],
    ids=["placed-not-initialised", "spec-changed"],
)
def test_an_adapter_not_initialised_for_this_generation_is_initialised_under_the_lock(
    status: dict[str, Any],
) -> None:
    assert plans.plan_adapter(observe(status, pod("p-0"))).step is Step.LOCK
    assert plans.plan_adapter(observe(status, pod("p-0"), locked=True)).step is Step.INITIALIZE


def test_a_pod_not_ready_within_the_grace_period_waits_and_beyond_it_moves() -> None:
    recent = pod("p-0", ready=False, changed=T0 - datetime.timedelta(seconds=10))
    plan = plans.plan_adapter(observe(READY, recent))
    assert plan.step is Step.WAIT and "not Ready" in plan.reason
    old = pod("p-0", ready=False, changed=T0 - datetime.timedelta(seconds=61))
    plan = plans.plan_adapter(observe(READY, old, locked=True))
    assert (plan.step, plan.move) == (Step.PLACE, Move.REPLACE)


def test_a_gone_or_replaced_pod_moves_the_adapter() -> None:
    gone = plans.plan_adapter(observe(READY, None, locked=True))
    assert (gone.step, gone.move, gone.reason) == (Step.PLACE, Move.REPLACE, "pod p-0 is gone")
    replaced = plans.plan_adapter(observe(READY, pod("p-0", uid="u9"), locked=True))
    assert (replaced.step, replaced.move) == (Step.PLACE, Move.REPLACE)
    assert "replaced by a new pod" in replaced.reason


def _pool(replicas: int = 2, most: int = 2) -> pools.Pool:
    body = {"baseModel": "builtin:tiny", "replicas": replicas, "maxAdaptersPerPod": most}
    return pools.parse({"metadata": {"namespace": "ns", "name": "p"}, "spec": body})


def test_choose_target_takes_the_least_loaded_ready_pod() -> None:
    pods = {p.name: p for p in (pod("p-0"), pod("p-1"))}
    target = plans.choose_target(_pool(), pods, ["p-0", None], plans.cache_bytes({}))
    assert isinstance(target, placing.PodView) and target.name == "p-1"


def test_choose_target_says_why_no_pod_can_take_it() -> None:
    pods = {p.name: p for p in (pod("p-0"), pod("p-1"))}
    full = plans.choose_target(_pool(most=1), pods, ["p-0", "p-1"], {})
    assert full == outcomes.Pending("PoolFull", "every Ready pod of p holds 1 adapters")
    none = plans.choose_target(_pool(), {"p-0": pod("p-0", ready=False)}, [], {})
    assert none == outcomes.Pending("NoReadyPod", "TrainerPool p has no Ready pod")
    assert plans.pool_missing("q") == outcomes.Pending("PoolNotFound", "TrainerPool q does not exist")


def test_cache_bytes_come_from_the_pool_status() -> None:
    status = {"pods": [{"name": "p-0", "cacheBytes": 5}, {"name": "p-1"}]}
    assert plans.cache_bytes(status) == {"p-0": 5, "p-1": 0}
