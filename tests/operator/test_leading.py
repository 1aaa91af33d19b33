"""Leader election: the pure Lease claim rules, and two replicas contending for one Lease on kmock."""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import kmock
from kubernetes import client

from lorafleet_local.polling import eventually_async
from lorafleet_operator import cli, leading, statuses
from lorafleet_operator.kube import KubeApi

T0 = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.UTC)


def held_by(holder: str, renewed: datetime.datetime, duration: int = 15) -> dict[str, Any]:
    stamp = renewed.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {
        "metadata": {"name": "op", "namespace": "ops", "resourceVersion": "7"},
        "spec": {"holderIdentity": holder, "renewTime": stamp, "leaseDurationSeconds": duration},
    }


def test_claim_a_free_lease() -> None:
    body = leading.claim(None, "me", T0, 15)
    assert body is not None
    assert body["spec"]["holderIdentity"] == "me"
    assert body["spec"]["leaseDurationSeconds"] == 15
    assert body["spec"]["leaseTransitions"] == 0


def test_a_valid_lease_of_another_holder_is_respected() -> None:
    lease = held_by("other", T0)
    assert leading.claim(lease, "me", T0 + datetime.timedelta(seconds=10), 15) is None


def test_an_expired_lease_is_taken_over_keeping_the_resource_version() -> None:
    lease = held_by("other", T0)
    body = leading.claim(lease, "me", T0 + datetime.timedelta(seconds=16), 15)
    assert body is not None
    assert body["spec"]["holderIdentity"] == "me"
    assert body["spec"]["leaseTransitions"] == 1
    # The update carries the version it read, so a concurrent taker gets a conflict.
    assert body["metadata"]["resourceVersion"] == "7"


def test_the_holder_renews() -> None:
    body = leading.claim(held_by("me", T0), "me", T0 + datetime.timedelta(seconds=5), 15)
    assert body is not None and body["spec"]["renewTime"].startswith("2026-01-01T12:00:05")


async def test_two_replicas_one_leader_then_failover(cluster: kmock.KubernetesEmulator) -> None:
    server = str(cluster.url).rstrip("/")
    first_api, second_api = (
        KubeApi(client.Configuration(host=server)),
        KubeApi(client.Configuration(host=server)),
    )
    first_has, second_has = asyncio.Event(), asyncio.Event()
    duration = 1.0
    options: dict[str, Any] = {"namespace": "ops", "name": "lorafleet-operator", "duration": duration}
    first = asyncio.create_task(leading.lead(first_api, identity="first", acquired=first_has, **options))
    await asyncio.wait_for(first_has.wait(), 5)
    lease = await first_api.get_lease("ops", "lorafleet-operator")
    assert lease is not None
    expired = datetime.datetime.fromisoformat(lease["spec"]["acquireTime"]) + datetime.timedelta(
        seconds=duration
    )
    # The second's clock notes when each of its attempts looks at the lease.
    looks: list[datetime.datetime] = []

    def second_clock() -> datetime.datetime:
        looks.append(statuses.now_utc())
        return looks[-1]

    second = asyncio.create_task(
        leading.lead(second_api, identity="second", acquired=second_has, clock=second_clock, **options)
    )
    # Wait until an attempt by the second has looked, and finished looking (the next one began),
    # at a moment the first's claim would have expired without its renewals.
    await eventually_async(
        "the second to look past the first claim's expiry",
        lambda: sum(t > expired for t in looks) >= 2,
        timeout=10,
    )
    assert not second_has.is_set()  # the first keeps renewing
    first.cancel()  # the leader dies without releasing
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.wait_for(second_has.wait(), 5)
    lease = await second_api.get_lease("ops", "lorafleet-operator")
    assert lease is not None and lease["spec"]["holderIdentity"] == "second"
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    await first_api.close()
    await second_api.close()


async def test_a_stale_update_loses(cluster: kmock.KubernetesEmulator) -> None:
    api = KubeApi(client.Configuration(host=str(cluster.url).rstrip("/")))
    first = leading.claim(None, "a", T0, 15)
    assert first is not None
    first["metadata"] = {"namespace": "ops", "name": "l"}
    assert await api.create_lease(first)
    read = await api.get_lease("ops", "l")
    assert read is not None
    renewed = leading.claim(read, "a", T0 + datetime.timedelta(seconds=1), 15)
    assert renewed is not None and await api.replace_lease(renewed)
    # A contender still holding the older version cannot overwrite the renewal.
    stale = leading.claim(read, "b", T0 + datetime.timedelta(seconds=30), 15)
    assert stale is not None and not await api.replace_lease(stale)
    final = await api.get_lease("ops", "l")
    assert final is not None and final["spec"]["holderIdentity"] == "a"
    await api.close()


def test_a_restarted_container_takes_its_own_lease_back_at_once() -> None:
    # The pod's name is the identity, so the same pod's next process is the holder already.
    identity = cli.lease_identity("lorafleet-operator-7d9c-abcde")
    assert identity == "lorafleet-operator-7d9c-abcde"
    body = leading.claim(held_by(identity, T0), identity, T0 + datetime.timedelta(seconds=1), 15)
    assert body is not None and body["spec"]["holderIdentity"] == identity
    # Outside a pod every process is its own holder, so two never share a Lease.
    assert cli.lease_identity(None) != cli.lease_identity(None)
