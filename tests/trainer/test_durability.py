"""Durability modes: the background writer of ``async`` mode, alone and inside a real engine.

The writer is held at a known moment with the real test holds (``write``), never by a guessed sleep:
while it is parked before a write, what is durable and what waits is exactly known.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.trainer.engine_helpers import max_diff, samples, stored_state

from lorafleet_local.polling import eventually
from lorafleet_trainer.engine.bundles import StateBundle
from lorafleet_trainer.engine.durability import BackgroundWriter
from lorafleet_trainer.engine.holds import WRITE, PhaseHolds
from lorafleet_trainer.engine.storage import AdapterMeta, AdapterStore
from lorafleet_trainer.errors import InvalidInput, StorageFull
from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.learning.configs import LoraSpec, TrainingSpec

A = AdapterId("durable", "a")
B = AdapterId("durable", "b")
C = AdapterId("durable", "c")
KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
CONFIG = {"peft_type": "LORA", "r": 2}
LORA = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))


class FillableStore(AdapterStore):
    """The real store; while ``full`` is set every write is refused as a full disk would be."""

    full = False

    def write(
        self,
        meta: AdapterMeta,
        tensors: StateBundle | None,
        adapter_config: Any = None,
        directory: str | None = None,
    ) -> None:
        if self.full:
            raise StorageFull(f"no space left to persist adapter {meta.adapter}: [Errno 28]")
        super().write(meta, tensors, adapter_config, directory)


def _meta(adapter: AdapterId, version: int) -> AdapterMeta:
    return AdapterMeta(adapter, version, 1, LoraSpec(rank=2), TrainingSpec(), "builtin:tiny")


def _bundle(fill: float) -> StateBundle:
    w = {KEY: torch.full((2, 4), fill)}
    return StateBundle.from_tensors(w, {KEY: torch.zeros(2, 4)}, {KEY: torch.zeros(2, 4)}, int(fill))


@pytest.fixture
def holds(tmp_path: Path) -> PhaseHolds:
    return PhaseHolds(tmp_path / "holds").enable()


@pytest.fixture
def store(tmp_path: Path) -> FillableStore:
    s = FillableStore(tmp_path / "store")
    for adapter in (A, B, C):
        s.write(_meta(adapter, 0), _bundle(0.0), CONFIG)
    return s


@pytest.fixture
def make_writer(store: FillableStore, holds: PhaseHolds) -> Iterator[Callable[..., BackgroundWriter]]:
    made: list[BackgroundWriter] = []

    def build(backlog: int = 4) -> BackgroundWriter:
        durable: list[tuple[AdapterId, int]] = []
        w = BackgroundWriter(
            store, backlog, on_durable=lambda a, v: durable.append((a, v)), hold=lambda: holds.at(WRITE)
        )
        w.durable_calls = durable  # type: ignore[attr-defined]
        made.append(w)
        return w

    yield build
    holds.release(WRITE)
    for w in made:
        w.close(10)


def _parked(holds: PhaseHolds) -> None:
    eventually("the writer to park before a write", lambda: holds.held(WRITE), timeout=30, interval=0.005)


def _durable(writer: BackgroundWriter, adapter: AdapterId, version: int) -> int:
    with writer.locked():
        d = writer.durable_locked(adapter)
    return version if d is None else d


def test_versions_handed_over_while_one_is_written_coalesce_into_the_newest(
    make_writer: Callable[..., BackgroundWriter], store: FillableStore, holds: PhaseHolds
) -> None:
    writer = make_writer()
    holds.arm(WRITE)
    writer.submit(_meta(A, 1), _bundle(1.0), durable=0)
    _parked(holds)  # v1 is being written: it can no longer be replaced
    for v in (2, 3, 4):
        writer.submit(_meta(A, v), _bundle(float(v)), durable=0)
    assert _durable(writer, A, 4) == 0 and writer.lag() == {A: 4}
    assert writer.coalesced == 2  # v2 and v3 will never reach the disk
    assert writer.holds(writer.bundle(A, 4) or _bundle(9.0)) and writer.bundle(A, 2) is None
    holds.release(WRITE)
    assert writer.flush(30)
    assert store.versions(A) == [0, 1, 4]
    assert store.read_meta(A).version == 4 and store.read_tensors(A).weights[KEY][0, 0] == 4.0
    assert writer.durable_calls == [(A, 1), (A, 4)]  # type: ignore[attr-defined]
    assert _durable(writer, A, 4) == 4 and writer.lag() == {} and writer.outstanding == 0


def test_a_full_backlog_makes_the_next_hand_off_wait_for_the_writer(
    make_writer: Callable[..., BackgroundWriter], store: FillableStore, holds: PhaseHolds
) -> None:
    writer = make_writer(backlog=2)
    holds.arm(WRITE)
    writer.submit(_meta(A, 1), _bundle(1.0), durable=0)
    _parked(holds)
    writer.submit(_meta(B, 1), _bundle(1.0), durable=0)  # the backlog is full: A being written, B waits
    writer.submit(_meta(B, 2), _bundle(2.0), durable=0)  # B's newer version takes B's place: no wait
    done = threading.Event()

    def hand_off_c() -> None:
        writer.submit(_meta(C, 1), _bundle(1.0), durable=0)
        done.set()

    waiter = threading.Thread(target=hand_off_c)
    waiter.start()
    eventually("C's hand-off to wait", lambda: writer.waits > 0, timeout=30, interval=0.005)
    assert not done.is_set() and writer.outstanding == 2  # nothing dropped, nothing past the bound
    holds.release(WRITE)  # A's write ends: room for C
    waiter.join(30)
    assert done.is_set()
    assert writer.flush(30)
    assert [store.read_meta(x).version for x in (A, B, C)] == [1, 2, 1]


def test_a_refused_write_is_kept_reported_and_retried(
    make_writer: Callable[..., BackgroundWriter], store: FillableStore
) -> None:
    writer = make_writer()
    store.full = True
    writer.submit(_meta(A, 1), _bundle(1.0), durable=0)
    assert not writer.flush(30)  # it returns once the refused write is parked: not durable
    assert "no space" in (writer.error(A) or "") and writer.failures == 1
    assert _durable(writer, A, 1) == 0 and writer.bundle(A, 1) is not None  # kept in memory only
    with pytest.raises(StorageFull, match=r"no space.*version 1 in memory only, durable version 0"):
        writer.settle(A)  # retried once, refused again
    assert store.read_meta(A).version == 0 and writer.failures == 2
    store.full = False
    writer.settle(A)
    assert store.read_meta(A).version == 1 and writer.error(A) is None and _durable(writer, A, 1) == 1


def test_a_backlog_full_of_refused_writes_refuses_the_hand_off(
    make_writer: Callable[..., BackgroundWriter], store: FillableStore
) -> None:
    writer = make_writer(backlog=1)
    store.full = True
    writer.submit(_meta(A, 1), _bundle(1.0), durable=0)
    assert not writer.flush(30)
    with pytest.raises(StorageFull, match=r"backlog .* full of versions the adapter store refused"):
        writer.submit(_meta(B, 1), _bundle(1.0), durable=0)
    assert writer.bundle(B, 1) is None and writer.bundle(A, 1) is not None
    store.full = False
    writer.submit(_meta(B, 1), _bundle(1.0), durable=0)  # a retry of A makes room
    assert writer.flush(30) and store.read_meta(A).version == 1 and store.read_meta(B).version == 1


def test_cancel_drops_the_waiting_version_and_waits_out_the_running_write(
    make_writer: Callable[..., BackgroundWriter], store: FillableStore, holds: PhaseHolds
) -> None:
    writer = make_writer()
    holds.arm(WRITE)
    writer.submit(_meta(A, 1), _bundle(1.0), durable=0)
    _parked(holds)
    writer.submit(_meta(A, 2), _bundle(2.0), durable=0)
    cancelled: list[bool] = []
    canceller = threading.Thread(target=lambda: cancelled.append(writer.cancel(A)))
    canceller.start()
    eventually("v2 to be dropped", lambda: writer.bundle(A, 2) is None, timeout=30, interval=0.005)
    assert canceller.is_alive()  # v1 is still being written
    holds.release(WRITE)
    canceller.join(30)
    assert cancelled == [True] and writer.flush(30)
    assert store.read_meta(A).version == 1 and writer.lag() == {}


# ---- the engine in async mode ------------------------------------------------------------------


def test_the_engine_refuses_an_unknown_durability(make_engine: Callable[..., Any]) -> None:
    with pytest.raises(InvalidInput, match="durability"):
        make_engine(durability="eventually")


@pytest.mark.parametrize("capacity", [1 << 30, 0], ids=["cached", "uncached"])
def test_async_answers_before_the_write_and_trains_exactly_as_sync(
    make_engine: Callable[..., Any], tmp_path: Path, capacity: int
) -> None:
    holds = PhaseHolds(tmp_path / "holds").enable()
    sync = make_engine(root="sync")
    fast = make_engine(capacity=capacity, root="async", durability="async", step_holds=holds)
    try:
        for engine in (sync, fast):
            engine.init_adapter(A, LORA, 1)
        holds.arm(WRITE)
        first = fast.distill(A, samples(1))
        _parked(holds)
        # Answered with v1 in memory; the writer holds it before its write. Steps go on from memory
        # (with no cache, from the writer's copy), and their versions coalesce behind it.
        assert (first.version, first.durable_version) == (1, 0)
        for seed in (2, 3):
            result = fast.distill(A, samples(seed))
            assert result.durable_version == 0
        state = fast.get_adapter(A)
        assert (state.version, state.durable_version, state.durable_error) == (3, 0, None)
        assert ".v00000000-" in state.artifact  # the durable version's own directory, which exists
        assert fast.store.read_meta(A).version == 0 and fast.stats().durable_lag_versions == 3
        holds.release(WRITE)
        assert fast.flush(30)
        assert fast.get_adapter(A).durable == 3 and fast.store.read_meta(A).version == 3
        for seed in (1, 2, 3):
            sync.distill(A, samples(seed))
        assert max_diff(stored_state(sync.store, A), stored_state(fast.store, A)) == 0.0
        assert fast.stats().writes_coalesced == 1 and fast.stats().durable_lag_versions == 0
    finally:
        holds.release(WRITE)
        fast.close(30)


def test_async_delete_cancels_and_evict_waits_for_the_pending_write(
    make_engine: Callable[..., Any], tmp_path: Path
) -> None:
    holds = PhaseHolds(tmp_path / "holds").enable()
    engine = make_engine(durability="async", step_holds=holds)
    try:
        engine.init_adapter(A, LORA, 1)
        engine.init_adapter(B, LORA, 1)
        holds.arm(WRITE)
        engine.distill(A, samples(1))
        _parked(holds)
        engine.distill(B, samples(1))  # waits behind A's write
        engine.distill(A, samples(2))
        evicted: list[bool] = []
        evicter = threading.Thread(target=lambda: evicted.append(engine.evict(B)))
        evicter.start()
        holds.release(WRITE)
        evicter.join(30)
        assert evicted == [True] and engine.store.read_meta(B).version == 1  # durable before evicted
        assert engine.delete(A)
        assert engine.flush(30) and not engine.store.exists(A)  # nothing written after the delete
    finally:
        holds.release(WRITE)
        engine.close(30)
