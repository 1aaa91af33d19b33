"""The adapter cache on its own: byte budget, LRU order, pin, evict, epochs, in-place snapshots."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from lorafleet_trainer.cache import AdapterCache, state_bytes
from lorafleet_trainer.ids import AdapterId


def _state(fill: float, n: int = 25) -> dict[str, torch.Tensor]:
    # 4 * n float32 + 8 bytes of step: 108 bytes for n = 25.
    return {
        "w.a": torch.full((n,), float(fill)),
        "m.a": torch.full((n,), float(fill)),
        "step": torch.tensor([int(fill)]),
    }


ONE = state_bytes(_state(0.0))


def _ids(n: int) -> list[AdapterId]:
    return [AdapterId("ns", f"a{i}") for i in range(n)]


def test_exact_bytes_and_lru_eviction() -> None:
    assert ONE == 25 * 4 * 2 + 8
    cache = AdapterCache(2 * ONE + 10)
    a, b, c = _ids(3)
    cache.put(a, 1, 0, _state(1))
    cache.put(b, 1, 0, _state(2))
    assert cache.used_bytes == 2 * ONE
    cache.get(a)  # a becomes most recently used, b is the LRU
    cache.put(c, 1, 0, _state(3))
    assert cache.lru_order() == [a, c]
    assert cache.evictions["lru"] == 1
    assert cache.used_bytes == 2 * ONE <= cache.capacity_bytes
    entry = cache.peek(a)
    assert entry is not None and float(entry.tensors["w.a"][0]) == 1.0


def test_entries_are_keyed_by_their_own_adapter() -> None:
    cache = AdapterCache(10 * ONE)
    a, b = _ids(2)
    cache.put(a, 3, 0, _state(1))
    cache.put(b, 7, 0, _state(2))
    ea, eb = cache.peek(a), cache.peek(b)
    assert ea is not None and eb is not None
    assert (ea.adapter, ea.version, float(ea.tensors["w.a"][0])) == (a, 3, 1.0)
    assert (eb.adapter, eb.version, float(eb.tensors["w.a"][0])) == (b, 7, 2.0)


def test_snapshot_reuses_buffers() -> None:
    cache = AdapterCache(10 * ONE)
    (a,) = _ids(1)
    first = cache.put(a, 1, 0, _state(1))
    assert first is not None
    ptrs = {k: t.data_ptr() for k, t in first.tensors.items()}
    second = cache.put(a, 2, 0, _state(5))
    assert second is first
    assert {k: t.data_ptr() for k, t in second.tensors.items()} == ptrs
    assert float(second.tensors["m.a"][3]) == 5.0 and int(second.tensors["step"][0]) == 5
    assert cache.used_bytes == ONE


def test_pin_is_never_lru_evicted_and_oversize_is_refused() -> None:
    cache = AdapterCache(2 * ONE)
    a, b, c = _ids(3)
    cache.pin(a)  # pinned before it is cached: remembered
    cache.put(a, 1, 0, _state(1))
    cache.put(b, 1, 0, _state(2))
    cache.put(c, 1, 0, _state(3))
    assert a in cache and b not in cache and c in cache
    cache.pin(c)
    assert cache.put(b, 2, 0, _state(2)) is None  # only pinned entries left: nothing evicted
    assert cache.lru_order() == [a, c] and cache.used_bytes == 2 * ONE
    assert cache.put(b, 1, 0, _state(1, n=1000)) is None  # larger than the whole budget
    assert cache.evict(a) is True  # explicit eviction ignores the pin
    assert cache.evict(a) is False
    assert cache.evictions == {"lru": 1, "explicit": 1, "invalidated": 0, "deleted": 0}


def test_epoch_invalidation_and_forget() -> None:
    cache = AdapterCache(4 * ONE)
    a, b = _ids(2)
    cache.put(a, 1, 2, _state(1))
    cache.put(b, 1, 2, _state(1))
    assert cache.invalidate_before(a, 2) is False  # same epoch keeps it
    assert cache.invalidate_before(a, 3) is True
    assert a not in cache and cache.evictions["invalidated"] == 1
    cache.pin(b)
    assert cache.forget(b) is True and not cache.is_pinned(b)
    assert cache.evictions["deleted"] == 1 and cache.used_bytes == 0


def test_disabled_cache_stores_nothing() -> None:
    cache = AdapterCache(0)
    assert not cache.enabled
    assert cache.put(_ids(1)[0], 1, 0, _state(1)) is None
    assert cache.info().to_dict() == {"capacity_bytes": 0, "used_bytes": 0, "entries": []}
    with pytest.raises(ValueError):
        AdapterCache(-1)


def test_concurrent_use_keeps_accounting_consistent() -> None:
    cache = AdapterCache(5 * ONE)
    ids = _ids(12)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for i in range(300):
                a = rng.choice(ids)
                op = rng.random()
                if op < 0.6:
                    cache.put(a, i, 0, _state(float(i % 50)))
                elif op < 0.8:
                    cache.get(a)
                elif op < 0.9:
                    cache.evict(a)
                else:
                    cache.pin(a, rng.random() < 0.3)
                assert cache.used_bytes <= cache.capacity_bytes
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    info = cache.info()
    assert info.used_bytes == sum(e["bytes"] for e in info.entries) <= info.capacity_bytes
    assert len({e["adapter"] for e in info.entries}) == len(info.entries)
