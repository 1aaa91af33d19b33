"""The CPU-resident adapter cache: a byte-budgeted LRU of LoRA weights plus AdamW state.

An entry holds one adapter's tensors (weights, both AdamW moments and the step count) in buffers
allocated once when it is admitted (page-locked when CUDA is present, so host<->device copies run at
full speed). Later snapshots copy into those same buffers in place, so a warm step allocates
nothing. Bytes are the exact sum of the buffers' sizes; the budget is never exceeded. Pinned
adapters are never LRU-evicted. Every eviction is reported with its reason
(``lru``/``explicit``/``invalidated``/``deleted``). All methods are thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lorafleet_trainer.ids import AdapterId

EVICTION_REASONS = ("lru", "explicit", "invalidated", "deleted")


@dataclass
class CacheEntry:
    adapter: AdapterId
    version: int
    epoch: int
    layout: Hashable
    tensors: dict[str, torch.Tensor]
    nbytes: int
    pinned: bool = False


@dataclass(frozen=True)
class CacheInfo:
    capacity_bytes: int
    used_bytes: int
    entries: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"capacity_bytes": self.capacity_bytes, "used_bytes": self.used_bytes, "entries": self.entries}


def _layout(source: Mapping[str, torch.Tensor]) -> tuple[Any, ...]:
    return tuple((k, tuple(t.shape), t.dtype) for k, t in sorted(source.items()))


def state_bytes(source: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in source.values())


class AdapterCache:
    """Byte-budgeted LRU keyed by adapter id; ``capacity_bytes == 0`` disables it entirely."""

    def __init__(self, capacity_bytes: int, *, pin_memory: bool = False) -> None:
        if capacity_bytes < 0:
            raise ValueError("capacity_bytes must be >= 0")
        self.capacity_bytes = capacity_bytes
        self.pin_memory = pin_memory
        self._entries: OrderedDict[AdapterId, CacheEntry] = OrderedDict()  # LRU first
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

    def get(self, adapter: AdapterId) -> CacheEntry | None:
        """The entry for ``adapter`` (marked most recently used), or None."""
        with self._lock:
            entry = self._entries.get(adapter)
            if entry is not None:
                self._entries.move_to_end(adapter)
            return entry

    def peek(self, adapter: AdapterId) -> CacheEntry | None:
        """Like :meth:`get` without touching the LRU order."""
        with self._lock:
            return self._entries.get(adapter)

    def put(
        self, adapter: AdapterId, version: int, epoch: int, source: Mapping[str, torch.Tensor]
    ) -> CacheEntry | None:
        """Store a copy of ``source`` as ``adapter``'s state; None if it cannot fit.

        An existing entry of the same layout is overwritten in place (no allocation); otherwise
        buffers are allocated once, after LRU-evicting unpinned entries to make room.
        """
        layout = _layout(source)
        with self._lock:
            entry = self._entries.get(adapter)
            if entry is not None and entry.layout != layout:
                self._drop(adapter, "invalidated")
                entry = None
            if entry is None:
                need = state_bytes(source)
                if not self._make_room(need, keep=adapter):
                    return None
                buffers = {
                    k: torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self.pin_memory)
                    for k, t in source.items()
                }
                entry = CacheEntry(adapter, version, epoch, layout, buffers, need, adapter in self._pinned)
                self._entries[adapter] = entry
                self.used_bytes += need
            for key, tensor in source.items():
                entry.tensors[key].copy_(tensor, non_blocking=self.pin_memory)
            if self.pin_memory and any(t.is_cuda for t in source.values()):
                # The device->host copies above are asynchronous; the entry is only valid after them.
                torch.cuda.synchronize()
            entry.version, entry.epoch = version, epoch
            self._entries.move_to_end(adapter)
            return entry

    def _make_room(self, need: int, keep: AdapterId) -> bool:
        if need > self.capacity_bytes:
            return False
        unpinned = sum(e.nbytes for a, e in self._entries.items() if not e.pinned and a != keep)
        if self.used_bytes - unpinned + need > self.capacity_bytes:
            return False  # even evicting every unpinned entry would not make room: evict nothing
        for victim in [a for a, e in self._entries.items() if not e.pinned and a != keep]:
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
            entry = self._entries.get(adapter)
            if entry is not None:
                entry.pinned = pinned

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
                {"adapter": str(a), "bytes": e.nbytes, "pinned": e.pinned, "version": e.version}
                for a, e in reversed(self._entries.items())  # most recently used first
            ]
            return CacheInfo(self.capacity_bytes, self.used_bytes, entries)

    def lru_order(self) -> list[AdapterId]:
        """Adapters from least to most recently used."""
        with self._lock:
            return list(self._entries)

    def pinned_host_bytes(self) -> int:
        with self._lock:
            return self.used_bytes if self.pin_memory else 0
