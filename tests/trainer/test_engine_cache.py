"""The engine with its CPU cache: same results as without it, no adapter reads when warm,
budget/LRU/pin/evict/epoch behaviour through the engine, and consistency under threads."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from tests.trainer.engine_helpers import max_diff, samples, stored_state

from lorafleet_trainer.engine import storage
from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.learning import sampling
from lorafleet_trainer.learning.configs import LoraSpec

LORA = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
A, B, C = AdapterId("team-a", "alice"), AdapterId("team-a", "bob"), AdapterId("team-b", "carol")


def _adapter_bytes(engine: Any, adapter: AdapterId) -> int:
    d = engine.store.path(adapter)
    return (d / storage.ADAPTER_WEIGHTS).stat().st_size + (d / storage.OPTIMIZER_STATE).stat().st_size


def test_cache_and_no_cache_train_identically(make_engine: Callable[..., Any]) -> None:
    cached = make_engine(root="cached")
    uncached = make_engine(capacity=0, root="uncached")
    for engine in (cached, uncached):
        for adapter in (A, B):
            engine.init_adapter(adapter, LORA, 1)
        # A twice then B: consecutive steps of one adapter and swaps of the shared slot.
        for step in range(3):
            for adapter in (A, A, B):
                engine.distill(adapter, samples(step))
    for adapter in (A, B):
        with_cache = stored_state(cached.store, adapter)
        without = stored_state(uncached.store, adapter)
        assert int(with_cache["step"][0]) == (6 if adapter == A else 3)
        assert max_diff(with_cache, without) <= 1e-6
        entry = cached.cache.peek(adapter)
        assert entry is not None and entry.version == (6 if adapter == A else 3)
        assert max_diff(entry.as_dict(), with_cache) == 0.0  # the entry is exactly what was stored
        # The weights really moved (B starts at zero), so the comparison is not vacuous.
        assert any(float(v.abs().max()) > 0 for k, v in with_cache.items() if ".lora_B." in k)
    assert uncached.stats().cache_hits == 0 and uncached.stats().cache_entries == 0
    # Entries are keyed by their own adapter: alice's entry is not bob's state.
    ea, eb = cached.cache.peek(A), cached.cache.peek(B)
    assert ea is not None and eb is not None and max_diff(ea.as_dict(), eb.as_dict()) > 1e-4


def test_a_generate_that_misses_fills_the_cache_so_the_next_call_reads_nothing(
    make_engine: Callable[..., Any],
) -> None:
    engine = make_engine()
    engine.init_adapter(A, LORA, 1)
    engine.distill(A, samples(1))
    assert engine.evict(A) is True
    size = _adapter_bytes(engine, A)
    reads = engine.store.read_bytes
    prompt, greedy = sampling.Prompt(token_ids=(5, 9, 14)), sampling.SamplingParams(max_tokens=4)
    first = engine.generate(A, prompt, greedy)
    assert first.cache_hit is False and engine.store.read_bytes == reads + size
    entry = engine.cache.peek(A)
    assert entry is not None and entry.version == 1  # what was read is now the entry
    assert max_diff(entry.as_dict(), stored_state(engine.store, A)) == 0.0
    reads = engine.store.read_bytes  # the check above read storage too
    again = engine.generate(A, prompt, greedy)
    assert again.cache_hit is True and again.token_ids == first.token_ids
    step = engine.distill(A, samples(2))
    assert step.cache_hit and step.storage_read_bytes == 0 and engine.store.read_bytes == reads
    assert step.version == 2 and engine.cache.peek(A) is not None


def test_warm_step_reads_nothing_cold_step_reads_adapter_once(make_engine: Callable[..., Any]) -> None:
    engine = make_engine()
    engine.init_adapter(A, LORA, 1)
    size = _adapter_bytes(engine, A)
    cold = engine.distill(A, samples(1))
    assert not cold.cache_hit and cold.storage_read_bytes == size
    reads = engine.store.read_bytes
    warm = engine.distill(A, samples(2))
    assert warm.cache_hit and warm.storage_read_bytes == 0 and engine.store.read_bytes == reads
    size = _adapter_bytes(engine, A)
    assert engine.evict(A) is True and engine.evict(A) is False
    again = engine.distill(A, samples(3))
    assert not again.cache_hit and again.storage_read_bytes == size
    stats = engine.stats()
    assert (stats.cache_hits, stats.cache_misses, stats.evictions["explicit"]) == (1, 2, 1)
    assert set(again.timing_ms) == {"restore", "compute", "snapshot", "persist"}
    assert engine.get_adapter(A).cached is True


def test_budget_lru_pin_and_epoch(make_engine: Callable[..., Any]) -> None:
    probe = make_engine(root="probe")
    probe.init_adapter(A, LORA, 1)
    probe.distill(A, samples(0))
    one = probe.cache.used_bytes
    engine = make_engine(capacity=2 * one + one // 2, root="lru")
    for adapter in (A, B, C):
        engine.init_adapter(adapter, LORA, 1)
    engine.distill(A, samples(0))
    engine.distill(B, samples(0))
    engine.distill(A, samples(1))  # B is now least recently used
    engine.distill(C, samples(0))
    assert engine.cache.lru_order() == [A, C]
    assert engine.stats().evictions["lru"] == 1
    assert engine.cache.used_bytes <= engine.cache.capacity_bytes

    engine.pin(A)
    engine.distill(B, samples(1))  # evicts C, never the pinned A
    engine.distill(C, samples(1))  # evicts B
    assert engine.cache.lru_order() == [A, C]
    assert [e["pinned"] for e in engine.cache_info().to_dict()["entries"]] == [False, True]

    # A newer epoch drops the cached state of older epochs; the next step reads storage.
    result = engine.init_adapter(C, LORA, 2)
    assert not result.created and result.state.epoch == 2 and not result.state.cached
    assert engine.stats().evictions["invalidated"] == 1
    step = engine.distill(C, samples(2))
    assert not step.cache_hit and step.version == 3
    assert engine.get_adapter(C).epoch == 2
    assert engine.stats().cache_bytes <= engine.stats().cache_capacity_bytes


def test_threads_keep_cache_and_storage_consistent(make_engine: Callable[..., Any]) -> None:
    probe = make_engine(root="probe")
    probe.init_adapter(A, LORA, 1)
    probe.distill(A, samples(0))
    engine = make_engine(capacity=2 * probe.cache.used_bytes, root="threads")
    adapters = [AdapterId("ns", f"a{i}") for i in range(3)]
    for adapter in adapters:
        engine.init_adapter(adapter, LORA, 1)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for j in range(2):
                engine.distill(adapters[(i + j) % 3], samples(i * 10 + j, n=1))
                engine.cache_info()
                engine.get_adapter(adapters[i % 3])
            engine.evict(adapters[i % 3])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(engine.get_adapter(a).version for a in adapters) == 8
    info = engine.cache_info()
    assert info.used_bytes == sum(e["bytes"] for e in info.entries) <= info.capacity_bytes
    for adapter in adapters:
        entry = engine.cache.peek(adapter)
        if entry is not None:
            assert entry.version == engine.get_adapter(adapter).version
            assert max_diff(entry.as_dict(), stored_state(engine.store, adapter)) == 0.0
    assert engine.stats().steps_ok == 8


def test_warm_steps_trade_two_buffers_and_allocate_none(make_engine: Callable[..., Any]) -> None:
    engine = make_engine()
    engine.init_adapter(A, LORA, 1)
    engine.distill(A, samples(0))  # cold: the snapshot buffer is allocated here
    engine.distill(A, samples(1))  # the first entry comes back as the next spare
    seen = set()
    for i in range(2, 6):
        engine.distill(A, samples(i))
        entry = engine.cache.peek(A)
        assert entry is not None and entry.version == i + 1 and entry.step == i + 1
        seen.add(entry.flat.data_ptr())
    # The entry and the slot's spare swap places each step: two buffers, never a third.
    assert len(seen) == 2
    assert torch.equal(entry.as_dict()["step"], stored_state(engine.store, A)["step"])


def test_consecutive_steps_skip_the_restore_copy(make_engine: Callable[..., Any]) -> None:
    engine = make_engine()
    for adapter in (A, B):
        engine.init_adapter(adapter, LORA, 1)
    slot = engine._slot(LORA)
    engine.distill(A, samples(0))  # miss: restored from storage
    n = slot.restores
    engine.distill(A, samples(1))  # the slot already holds A's cached version
    assert slot.restores == n
    engine.distill(B, samples(0))
    engine.distill(A, samples(2))  # B took the slot in between: a real restore
    assert slot.restores == n + 2
    engine.evict(A)
    engine.distill(A, samples(3))  # evicted: read from storage again, never trusted from the slot
    assert slot.restores == n + 3


def test_moving_back_to_a_pod_picks_up_training_done_elsewhere(make_engine: Callable[..., Any]) -> None:
    first = make_engine(root="shared")
    second = make_engine(root="shared")  # another pod on the same adapter store
    first.init_adapter(A, LORA, 1)
    first.distill(A, samples(0))
    first.distill(A, samples(1))  # first pod: version 2, cached at epoch 1
    assert second.init_adapter(A, LORA, 2).state.version == 2
    for i in range(3):
        second.distill(A, samples(10 + i))  # re-placed: version 5 at epoch 2
    back = first.init_adapter(A, LORA, 3)  # placed back on the first pod
    assert (back.state.version, back.state.epoch, back.state.cached) == (5, 3, False)
    step = first.distill(A, samples(20))
    assert step.version == 6 and not step.cache_hit
    assert first.stats().evictions["invalidated"] == 1
