"""When a step answers: after its version is durable (``sync``) or after the in-memory commit (``async``).

In ``async`` mode a step hands its snapshot to the :class:`BackgroundWriter` and answers; one writer
thread persists the hand-offs with the store's atomic write (write aside, fsync, rename), oldest
adapter first. While a version of an adapter still waits, a newer one replaces it (coalescing): the
versions in between are never written, by design, and a crash loses exactly the versions past the
adapter's ``durable_version``. The writer holds at most ``backlog`` versions (waiting or being
written); a step that would need one more waits for the writer before it commits (back-pressure),
it never drops one.

A write the store refuses (a full disk) is kept, parked, with its error: the adapter's state says
so, the adapter's next step first retries it and answers 507 if it fails again, and any other
adapter's hand-off retries every parked write once. Nothing is reported durable that is not.

Locks: the writer's condition is taken after the engine's step lock and before its info lock; the
writer thread holds it only to pick and to record, never while it writes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from lorafleet_trainer.engine.bundles import StateBundle
from lorafleet_trainer.engine.storage import AdapterMeta, AdapterStore
from lorafleet_trainer.errors import StorageFull
from lorafleet_trainer.ids import AdapterId

MODES = ("sync", "async")
DEFAULT_BACKLOG = 16
log = logging.getLogger(__name__)


@dataclass
class _Entry:
    meta: AdapterMeta
    bundle: StateBundle
    directory: str | None = None  # the version directory's name, as its artifact was answered
    parked: bool = False  # the store refused it; retried only when asked (see the module doc)


class BackgroundWriter:
    """Persists handed-off versions on its own thread, newest per adapter, at most ``backlog`` at once.

    ``on_durable(adapter, version)`` is called (on the writer thread, no lock held) after each
    version the writer made durable. ``hold`` (tests) is called before each write.
    """

    def __init__(
        self,
        store: AdapterStore,
        backlog: int = DEFAULT_BACKLOG,
        on_durable: Callable[[AdapterId, int], None] | None = None,
        hold: Callable[[], None] | None = None,
    ) -> None:
        if isinstance(backlog, bool) or not isinstance(backlog, int) or backlog < 1:
            raise ValueError("backlog must be an integer >= 1")
        self.store = store
        self.backlog = backlog
        self.on_durable = on_durable
        self._hold = hold
        self._cond = threading.Condition()
        self._queued: dict[AdapterId, _Entry] = {}  # oldest hand-off first; a newer one keeps the place
        self._writing: _Entry | None = None
        self._durable: dict[AdapterId, int] = {}  # only adapters with a version not yet durable
        self._errors: dict[AdapterId, str] = {}  # the last refused write, until one succeeds
        self._closed = False
        self.written = 0
        self.coalesced = 0
        self.waits = 0  # hand-offs that waited for room (back-pressure)
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="lorafleet-writer", daemon=True)
        self._thread.start()

    # ---- the step's side (under the engine's step lock) ------------------------------------
    def submit(
        self, meta: AdapterMeta, bundle: StateBundle, durable: int, directory: str | None = None
    ) -> None:
        """Hand ``meta``'s version over; ``durable`` is the adapter's durable version now;
        ``directory`` the version directory's name (``AdapterStore.new_directory``).

        Waits while the backlog is full. Raises :class:`StorageFull` (nothing handed over) when it
        is full of writes the store refused and a retry of each failed again.
        """
        adapter = meta.adapter
        with self._cond:
            if self._closed:
                raise RuntimeError("the writer is closed")
            self._unpark_all()  # new work: give each refused write another try
            retried = False
            while adapter not in self._queued and self._outstanding() >= self.backlog:
                if self._writing is None and all(e.parked for e in self._queued.values()):
                    if retried:
                        raise StorageFull(
                            f"the write backlog ({self.backlog} versions) is full of versions the "
                            f"adapter store refused: {'; '.join(sorted(set(self._errors.values())))}"
                        )
                    retried = True
                    self._unpark_all()
                self.waits += 1
                self._cond.wait()
            if adapter in self._queued:
                self.coalesced += 1  # the waiting version will never be written
            self._durable.setdefault(adapter, durable)
            self._queued[adapter] = _Entry(meta, bundle, directory)
            self._cond.notify_all()

    def settle(self, adapter: AdapterId) -> None:
        """Wait until ``adapter`` has no version waiting or being written (a refused one is retried
        once); raises :class:`StorageFull` if it was refused again."""
        with self._cond:
            entry = self._queued.get(adapter)
            if entry is not None:
                entry.parked = False
                self._cond.notify_all()
            while self._pending_for(adapter):
                entry = self._queued.get(adapter)
                if entry is not None and entry.parked and self._writing_for(adapter) is False:
                    raise StorageFull(self._failure(adapter))
                self._cond.wait()

    def cancel(self, adapter: AdapterId) -> bool:
        """Drop ``adapter``'s waiting version and wait out one being written (the adapter is being
        deleted); True when a version was dropped unwritten."""
        with self._cond:
            dropped = self._queued.pop(adapter, None) is not None
            while self._writing_for(adapter):
                self._cond.wait()
            # A write that failed meanwhile was parked again: it goes too.
            dropped = self._queued.pop(adapter, None) is not None or dropped
            self._durable.pop(adapter, None)
            self._errors.pop(adapter, None)
            self._cond.notify_all()
            return dropped

    # ---- reads ---------------------------------------------------------------------------
    @contextmanager
    def locked(self) -> Iterator[None]:
        """Read an adapter's version and its durable version as one moment."""
        with self._cond:
            yield

    def durable_locked(self, adapter: AdapterId) -> int | None:
        """``adapter``'s durable version while a newer one is not yet durable, else None (under
        :meth:`locked`)."""
        return self._durable.get(adapter) if self._pending_for(adapter) else None

    def error(self, adapter: AdapterId) -> str | None:
        with self._cond:
            return self._errors.get(adapter)

    def bundle(self, adapter: AdapterId, version: int) -> StateBundle | None:
        """The handed-off state of ``adapter``'s ``version`` while the writer still holds it."""
        with self._cond:
            for entry in (self._queued.get(adapter), self._writing):
                if entry is not None and entry.meta.adapter == adapter and entry.meta.version == version:
                    return entry.bundle
            return None

    def holds(self, bundle: StateBundle) -> bool:
        """Whether ``bundle`` is waiting or being written (then no one may write into it)."""
        with self._cond:
            return any(e.bundle is bundle for e in (*self._queued.values(), self._writing) if e is not None)

    def lag(self) -> dict[AdapterId, int]:
        """Per adapter with a version not yet durable: how many versions it is behind."""
        with self._cond:
            newest: dict[AdapterId, int] = {}
            for entry in (self._writing, *self._queued.values()):
                if entry is not None:
                    a = entry.meta.adapter
                    newest[a] = max(newest.get(a, 0), entry.meta.version)
            return {a: v - self._durable.get(a, v) for a, v in newest.items()}

    @property
    def outstanding(self) -> int:
        with self._cond:
            return self._outstanding()

    # ---- lifecycle -----------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every handed-off version is durable or refused (each refused one retried
        once); True when nothing is left waiting."""
        with self._cond:
            self._unpark_all()
            self._cond.wait_for(self._idle, timeout)
            return not self._queued and self._writing is None

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the thread; True when every version handed over is durable."""
        flushed = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if not flushed:
            log.error("shutting down with versions not durable: %s", self.lag())
        return flushed

    # ---- the writer thread ----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                entry = self._next()
                while entry is None and not self._closed:
                    self._cond.wait()
                    entry = self._next()
                if entry is None:
                    return
                del self._queued[entry.meta.adapter]
                self._writing = entry
            if self._hold is not None:
                self._hold()
            error = self._write(entry)
            adapter, version = entry.meta.adapter, entry.meta.version
            with self._cond:
                self._writing = None
                if error is None:
                    self.written += 1
                    self._errors.pop(adapter, None)
                    if adapter in self._durable:
                        self._durable[adapter] = version
                elif adapter not in self._queued and adapter in self._durable:
                    entry.parked = True  # kept: the adapter's newest state, in memory only
                    self._queued[adapter] = entry
                    self._errors[adapter] = error
                elif adapter in self._durable:
                    self._errors[adapter] = error  # a newer version waits and will be tried
                if not self._pending_for(adapter):
                    self._durable.pop(adapter, None)
                self._cond.notify_all()
            if error is None and self.on_durable is not None:
                try:
                    self.on_durable(adapter, version)
                except Exception:
                    log.exception("on_durable failed for %s v%d", adapter, version)

    def _write(self, entry: _Entry) -> str | None:
        try:
            self.store.write(entry.meta, entry.bundle, directory=entry.directory)
        except Exception as exc:  # StorageFull and any other failure: kept and reported, never lost
            log.warning("writing %s v%d failed: %s", entry.meta.adapter, entry.meta.version, exc)
            with self._cond:
                self.failures += 1
            return f"writing version {entry.meta.version} failed: {exc}"
        return None

    # ---- under the condition ---------------------------------------------------------------
    def _next(self) -> _Entry | None:
        return next((e for e in self._queued.values() if not e.parked), None)

    def _idle(self) -> bool:
        return self._writing is None and all(e.parked for e in self._queued.values())

    def _outstanding(self) -> int:
        return len(self._queued) + (self._writing is not None)

    def _pending_for(self, adapter: AdapterId) -> bool:
        return adapter in self._queued or self._writing_for(adapter)

    def _writing_for(self, adapter: AdapterId) -> bool:
        return self._writing is not None and self._writing.meta.adapter == adapter

    def _unpark_all(self) -> None:
        for entry in self._queued.values():
            entry.parked = False
        self._cond.notify_all()

    def _failure(self, adapter: AdapterId) -> str:
        durable = self._durable.get(adapter)
        entry = self._queued.get(adapter)
        newest = entry.meta.version if entry is not None else durable
        return (
            f"{self._errors.get(adapter, 'the write failed')}; adapter {adapter} is at version {newest} "
            f"in memory only, durable version {durable}"
        )
