"""The CPU-resident adapter cache: a byte-budgeted LRU of LoRA weights plus AdamW state.

An entry is one adapter's :class:`~lorafleet_trainer.engine.bundles.StateBundle` (weights, both AdamW
moments and the step in one flat buffer, page-locked when CUDA is present so a restore is one
full-speed copy). The engine snapshots a step into a spare buffer and hands it over; the entry it
replaces comes back as the next spare, so warm steps trade two buffers and allocate nothing. Bytes
are the exact sum of the entries' buffers; the budget is never exceeded. Pinned
adapters are never LRU-evicted. Every eviction is reported with its reason
(``lru``/``explicit``/``invalidated``/``deleted``). All methods are thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from lorafleet_trainer.engine.bundles import StateBundle
from lorafleet_trainer.ids import AdapterId

EVICTION_REASONS = ("lru", "explicit", "invalidated", "deleted")


@dataclass(frozen=True)
class CacheInfo:
    capacity_bytes: int
    used_bytes: int
    entries: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"capacity_bytes": self.capacity_bytes, "used_bytes": self.used_bytes, "entries": self.entries}


class AdapterCache:
    """Byte-budgeted LRU keyed by adapter id; ``capacity_bytes == 0`` disables it entirely."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError("capacity_bytes must be >= 0")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[AdapterId, StateBundle] = OrderedDict()  # LRU first
        self._pinned: set[AdapterId] = set()
        self._lock = threading.RLock()
        self.used_bytes = 0
        self.evictions: dict[str, int] = dict.fromkeys(EVICTION_REASONS, 0)

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, adapter: AdapterId) -> bool:
        with self._lock:
            return adapter in self._entries

    def get(self, adapter: AdapterId) -> StateBundle | None:
        """The entry for ``adapter`` (marked most recently used), or None."""
        with self._lock:
            entry = self._entries.get(adapter)
            if entry is not None:
                self._entries.move_to_end(adapter)
            return entry

    def peek(self, adapter: AdapterId) -> StateBundle | None:
        """Like :meth:`get` without touching the LRU order."""
        with self._lock:
            return self._entries.get(adapter)

    def put(self, bundle: StateBundle) -> tuple[bool, StateBundle | None]:
        """Take ``bundle`` (labelled with its adapter and version) as that adapter's entry.

        Returns ``(admitted, spare)``: the entry it replaced, whose buffer the caller may reuse for
        its next snapshot (so warm steps allocate nothing), or ``bundle`` itself when it could not
        fit. Room is made by LRU-evicting unpinned entries, never beyond the budget.
        """
        adapter = bundle.adapter
        if adapter is None:
            raise ValueError("a cache entry must be labelled with its adapter")
        with self._lock:
            old = self._entries.pop(adapter, None)
            if old is not None:
                self.used_bytes -= old.nbytes
            if not self._make_room(bundle.nbytes):
                if old is not None:
                    self.evictions["invalidated"] += 1  # the old version is stale now
                return False, bundle
            self._entries[adapter] = bundle
            self.used_bytes += bundle.nbytes
            return True, old

    def _make_room(self, need: int) -> bool:
        if need > self.capacity_bytes:
            return False
        unpinned = sum(e.nbytes for a, e in self._entries.items() if a not in self._pinned)
        if self.used_bytes - unpinned + need > self.capacity_bytes:
            return False  # even evicting every unpinned entry would not make room: evict nothing
        for victim in [a for a in self._entries if a not in self._pinned]:
            if self.used_bytes + need <= self.capacity_bytes:
                break
            self._drop(victim, "lru")
        return True

    def _drop(self, adapter: AdapterId, reason: str) -> bool:
        entry = self._entries.pop(adapter, None)
        if entry is None:
            return False
        self.used_bytes -= entry.nbytes
        self.evictions[reason] += 1
        return True

    def evict(self, adapter: AdapterId, reason: str = "explicit") -> bool:
        """Drop ``adapter``'s entry; False (and no count) when it was not cached."""
        if reason not in EVICTION_REASONS:
            raise ValueError(f"unknown eviction reason {reason!r}")
        with self._lock:
            return self._drop(adapter, reason)

    def invalidate_before(self, adapter: AdapterId, epoch: int) -> bool:
        """Drop ``adapter``'s entry if it holds state from an epoch older than ``epoch``."""
        with self._lock:
            entry = self._entries.get(adapter)
            if entry is None or entry.epoch >= epoch:
                return False
            return self._drop(adapter, "invalidated")

    def pin(self, adapter: AdapterId, pinned: bool = True) -> None:
        """Mark ``adapter`` as never LRU-evicted (remembered even before it is cached)."""
        with self._lock:
            if pinned:
                self._pinned.add(adapter)
            else:
                self._pinned.discard(adapter)

    def is_pinned(self, adapter: AdapterId) -> bool:
        with self._lock:
            return adapter in self._pinned

    def forget(self, adapter: AdapterId) -> bool:
        """Drop the entry and the pin of a deleted adapter."""
        with self._lock:
            self._pinned.discard(adapter)
            return self._drop(adapter, "deleted")

    def info(self) -> CacheInfo:
        with self._lock:
            entries = [
                {"adapter": str(a), "bytes": e.nbytes, "pinned": a in self._pinned, "version": e.version}
                for a, e in reversed(self._entries.items())  # most recently used first
            ]
            return CacheInfo(self.capacity_bytes, self.used_bytes, entries)

    def lru_order(self) -> list[AdapterId]:
        """Adapters from least to most recently used."""
        with self._lock:
            return list(self._entries)
