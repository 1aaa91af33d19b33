"""Full disk: a step that cannot persist answers 507 and changes nothing; freed space heals it.

The trainer's storage is a small tmpfs. After a few good steps the disk is filled so that the
next version cannot be written: the step must answer 507 with a clear error, the adapter must stay
at its version in the API, on disk and in the cache, and its files stay whole. Once the filler is
removed the next steps succeed, and the weights equal a replay of only the answered steps (the
failed step left no trace, not even in the optimizer).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.reliability import disk, killing, replay, stored
from tests.trainer.service import live, payloads

from lorafleet_local.polling import eventually


def _on_small_disk(
    tmp_path: Path, model_cache: Path, args: list[str]
) -> Iterator[tuple[live.LiveTrainer, Path]]:
    """A trainer (with ``args``) whose adapter store is a 4 MiB tmpfs: (the trainer, the store)."""
    workdir = tmp_path / "trainer"
    try:
        with disk.small_tmpfs(workdir / "adapters", 4 << 20) as storage:
            server = live.start_trainer(workdir, token=killing.TOKEN, model_cache_dir=model_cache, args=args)
            try:
                yield server, storage
            finally:
                server.stop()
    except disk.CannotMount as exc:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {exc}")


@pytest.fixture
def small_trainer(tmp_path: Path, model_cache: Path) -> Iterator[tuple[live.LiveTrainer, Path]]:
    yield from _on_small_disk(tmp_path, model_cache, [])


def _cached_version(server: live.LiveTrainer) -> int | None:
    entries = server.client().get("/v1/cache").json()["entries"]
    found = [e["version"] for e in entries if e["adapter"] == f"{killing.NAMESPACE}/{killing.NAME}"]
    return found[0] if found else None


def test_full_disk_fails_the_step_with_507_and_changes_nothing(
    small_trainer: tuple[live.LiveTrainer, Path], tmp_path: Path, model_cache: Path
) -> None:
    server, storage = small_trainer
    client = server.client()
    assert client.put(killing.ROUTE, json=payloads.init_body(epoch=1)).status_code in (200, 201)
    applied: list[int] = []
    for seed in range(3):
        r = client.post(f"{killing.ROUTE}/distill", json=killing.body(seed))
        assert r.status_code == 200, r.text
        applied.append(seed)
    version_bytes = disk.tree_bytes((storage / killing.NAMESPACE / killing.NAME).resolve())
    before = {p: p.read_bytes() for p in (storage / killing.NAMESPACE / killing.NAME).resolve().iterdir()}

    disk.fill(storage, leave_free=version_bytes // 3)
    for seed in (100, 101):  # twice: a second failure must not differ from the first
        r = client.post(f"{killing.ROUTE}/distill", json=killing.body(seed))
        assert r.status_code == 507, r.text
        assert "space" in r.json()["error"]
        assert client.get(killing.ROUTE).json()["version"] == len(applied)
        assert _cached_version(server) in (None, len(applied))
        stored.assert_whole(storage, killing.NAMESPACE, killing.NAME, len(applied))
        current = (storage / killing.NAMESPACE / killing.NAME).resolve()
        assert {p: p.read_bytes() for p in current.iterdir()} == before

    disk.unfill(storage)
    for seed in (3, 4):
        r = client.post(f"{killing.ROUTE}/distill", json=killing.body(seed))
        assert r.status_code == 200, r.text
        applied.append(seed)
        assert r.json()["version"] == len(applied)
    stored.assert_whole(storage, killing.NAMESPACE, killing.NAME, len(applied))
    diff = replay.max_difference(
        replay.stored_tensors(storage), replay.replay(tmp_path / "replay", model_cache, applied)
    )
    assert diff < replay.TOLERANCE, f"after the failed steps the weights differ from the replay by {diff}"


@pytest.fixture
def small_async_trainer(tmp_path: Path, model_cache: Path) -> Iterator[tuple[live.LiveTrainer, Path]]:
    yield from _on_small_disk(tmp_path, model_cache, ["--durability", "async"])


def test_full_disk_in_async_mode_is_reported_never_claimed_durable_and_heals(
    small_async_trainer: tuple[live.LiveTrainer, Path], tmp_path: Path, model_cache: Path
) -> None:
    """Durability async: the step that committed in memory answers 200, but its refused write shows
    in the state (durable_version stays, durable_error says why); the next step answers 507 and
    changes nothing; freed space heals it, and the store then holds every answered step."""
    server, storage = small_async_trainer
    client = server.client()
    assert client.put(killing.ROUTE, json=payloads.init_body(epoch=1)).status_code in (200, 201)

    def state() -> dict[str, object]:
        return dict(client.get(killing.ROUTE).json())

    applied: list[int] = []
    for seed in range(2):
        assert client.post(f"{killing.ROUTE}/distill", json=killing.body(seed)).status_code == 200
        applied.append(seed)
    eventually("v2 to be durable", lambda: state()["durable_version"] == 2, timeout=60)
    version_bytes = disk.tree_bytes((storage / killing.NAMESPACE / killing.NAME).resolve())

    disk.fill(storage, leave_free=version_bytes // 3)
    r = client.post(f"{killing.ROUTE}/distill", json=killing.body(2))
    assert r.status_code == 200, r.text  # committed in memory; its write comes after the answer
    applied.append(2)
    eventually("the refused write to show", lambda: state()["durable_error"] is not None, timeout=60)
    now = state()
    assert (now["version"], now["durable_version"]) == (3, 2) and "space" in str(now["durable_error"])
    stored.assert_whole(storage, killing.NAMESPACE, killing.NAME, 2)  # nothing claimed that is not
    r = client.post(f"{killing.ROUTE}/distill", json=killing.body(100))
    assert r.status_code == 507 and "space" in r.json()["error"], r.text
    assert "durable version 2" in r.json()["error"]
    assert (state()["version"], state()["durable_version"]) == (3, 2)
    assert server.metrics()[("lorafleet_trainer_write_failures_total", ())] >= 2

    disk.unfill(storage)
    r = client.post(f"{killing.ROUTE}/distill", json=killing.body(3))  # retries v3's write first
    assert r.status_code == 200 and r.json()["version"] == 4, r.text
    applied.append(3)
    eventually("v4 to be durable", lambda: state()["durable_version"] == 4, timeout=60)
    assert state()["durable_error"] is None
    stored.assert_whole(storage, killing.NAMESPACE, killing.NAME, 4)
    diff = replay.max_difference(
        replay.stored_tensors(storage), replay.replay(tmp_path / "replay", model_cache, applied)
    )
    assert diff < replay.TOLERANCE, f"after the refused writes the weights differ from the replay by {diff}"
