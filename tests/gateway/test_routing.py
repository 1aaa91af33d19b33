"""Which server answers a chat: one serving the adapter's latest version, else the newest served."""

from __future__ import annotations

from lorafleet_api import adapters, wire
from lorafleet_gateway import routing

SERVERS = {"v0": "http://127.0.0.1:1", "v1": "http://127.0.0.1:2", "v2": "http://127.0.0.1:3"}


def state(latest: int, served: dict[str, int | None], error: str | None = None) -> wire.AdapterState:
    return wire.AdapterState(
        namespace="team-a",
        name="alice",
        version=latest,
        epoch=1,
        lora=adapters.Lora(),
        cached=True,
        cache_bytes=1,
        artifact="team-a/.alice.v00000001",
        durable_version=latest,
        durable_error=None,
        served_name="alice",
        served=[
            wire.ServedVersion(server=s, version=v, error=error if s == "v2" else None, since=None)
            for s, v in served.items()
        ],
    )


def test_only_servers_with_the_latest_version_when_one_has_it() -> None:
    now = state(5, {"v0": 4, "v1": 5, "v2": 5}, error="refused")
    picks = {routing.choose(now, SERVERS, latest_only=True).server for _ in range(6)}  # type: ignore[union-attr]
    assert picks == {"v1"}  # v2 reports a failed load: not routed to


def test_without_the_latest_the_newest_served_or_nothing() -> None:
    behind = state(6, {"v0": 4, "v1": 5})
    assert routing.choose(behind, SERVERS, latest_only=True) is None
    older = routing.choose(behind, SERVERS, latest_only=False)
    assert older is not None and (older.server, older.version, older.is_latest) == ("v1", 5, False)
    assert routing.choose(state(1, {"v0": None}), SERVERS, latest_only=False) is None
    assert routing.choose(state(1, {"elsewhere": 1}), SERVERS, latest_only=False) is None
