"""The adapter cache on its own: byte budget, LRU order, pin, evict, epochs, in-place snapshots."""

from __future__ import annotations

import random
import threading

import pytest

from lorafleet_trainer.engine.bundles import Layout, StateBundle
from lorafleet_trainer.engine.cache import AdapterCache
from lorafleet_trainer.ids import AdapterId


def _state(adapter: AdapterId, version: int, epoch: int, fill: float, n: int = 25) -> StateBundle:
    # 3 sections of n float32: 300 bytes for n = 25.
    bundle = StateBundle.empty(Layout.of({"a": (n,)}))
    bundle.flat.fill_(float(fill))
    bundle.step = int(fill)
    bundle.label(adapter, version, epoch)
    return bundle


def _put(cache: AdapterCache, adapter: AdapterId, version: int, epoch: int, fill: float, n: int = 25) -> bool:
    admitted, _ = cache.put(_state(adapter, version, epoch, fill, n))
    return admitted


ONE = Layout.of({"a": (25,)}).nbytes


def _ids(n: int) -> list[AdapterId]:
    return [AdapterId("ns", f"a{i}") for i in range(n)]


def test_exact_bytes_and_lru_eviction() -> None:
    assert ONE == 25 * 4 * 4  # weights, two AdamW moments, the EMA
    cache = AdapterCache(2 * ONE + 10)
    a, b, c = _ids(3)
    _put(cache, a, 1, 0, 1)
    _put(cache, b, 1, 0, 2)
    assert cache.used_bytes == 2 * ONE
    cache.get(a)  # a becomes most recently used, b is the LRU
    _put(cache, c, 1, 0, 3)
    assert cache.lru_order() == [a, c]
    assert cache.evictions["lru"] == 1
    assert cache.used_bytes == 2 * ONE <= cache.capacity_bytes
    entry = cache.peek(a)
    assert entry is not None and float(entry.weights["a"][0]) == 1.0


def test_entries_are_keyed_by_their_own_adapter() -> None:
    cache = AdapterCache(10 * ONE)
    a, b = _ids(2)
    _put(cache, a, 3, 0, 1)
    _put(cache, b, 7, 0, 2)
    ea, eb = cache.peek(a), cache.peek(b)
    assert ea is not None and eb is not None
    assert (ea.adapter, ea.version, float(ea.weights["a"][0])) == (a, 3, 1.0)
    assert (eb.adapter, eb.version, float(eb.weights["a"][0])) == (b, 7, 2.0)


def test_a_replaced_entry_comes_back_as_the_spare() -> None:
    cache = AdapterCache(10 * ONE)
    (a,) = _ids(1)
    first = _state(a, 1, 0, 1.0)
    assert cache.put(first) == (True, None)  # nothing replaced: the caller allocates its next spare
    second = _state(a, 2, 0, 5.0)
    admitted, spare = cache.put(second)
    assert admitted and spare is first  # the old buffer is the next snapshot's
    assert cache.peek(a) is second and float(second.exp_avg["a"][3]) == 5.0 and second.step == 5
    assert cache.used_bytes == ONE
    refused = _state(a, 3, 0, 1.0, n=1000)
    assert cache.put(refused) == (False, refused)  # too large: the caller keeps its buffer
    assert a not in cache and cache.evictions["invalidated"] == 1  # the stale version went


def test_pin_is_never_lru_evicted_and_oversize_is_refused() -> None:
    cache = AdapterCache(2 * ONE)
    a, b, c = _ids(3)
    cache.pin(a)  # pinned before it is cached: remembered
    _put(cache, a, 1, 0, 1)
    _put(cache, b, 1, 0, 2)
    _put(cache, c, 1, 0, 3)
    assert a in cache and b not in cache and c in cache
    cache.pin(c)
    assert not _put(cache, b, 2, 0, 2)  # only pinned entries left: nothing evicted
    assert cache.lru_order() == [a, c] and cache.used_bytes == 2 * ONE
    assert not _put(cache, b, 1, 0, 1, n=1000)  # larger than the whole budget
    assert cache.evict(a) is True  # explicit eviction ignores the pin
    assert cache.evict(a) is False
    assert cache.evictions == {"lru": 1, "explicit": 1, "invalidated": 0, "deleted": 0}


def test_epoch_invalidation_and_forget() -> None:
    cache = AdapterCache(4 * ONE)
    a, b = _ids(2)
    _put(cache, a, 1, 2, 1)
    _put(cache, b, 1, 2, 1)
    assert cache.invalidate_before(a, 2) is False  # same epoch keeps it
    assert cache.invalidate_before(a, 3) is True
    assert a not in cache and cache.evictions["invalidated"] == 1
    cache.pin(b)
    assert cache.forget(b) is True and not cache.is_pinned(b)
    assert cache.evictions["deleted"] == 1 and cache.used_bytes == 0


def test_disabled_cache_stores_nothing() -> None:
    cache = AdapterCache(0)
    assert not cache.enabled
    assert not _put(cache, _ids(1)[0], 1, 0, 1)
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
                    _put(cache, a, i, 0, float(i % 50))
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
