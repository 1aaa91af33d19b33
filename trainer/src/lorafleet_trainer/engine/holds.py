"""Test-only step holds: park the step worker at a named phase so a fault lands at a known moment.

Fault tests lose a pod or kill a trainer "in the middle of a step"; without a hold, where the fault
lands depends on how fast the machine computes. With ``--test-hold-dir DIR`` a step, before each
phase in :data:`PHASES`, looks for the file ``DIR/<phase>``: while it exists the worker parks there,
having written ``DIR/<phase>.held`` so the test knows it has arrived. Removing ``DIR/<phase>``
releases it. The setting is off by default and refused unless the trainer listens on loopback
only (see ``settings``): a trainer reachable from a network is never a test trainer.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

# The moments a step can be held at, in the order a step reaches them. "restore" is before the
# adapter is restored, "compute" before the loss and update, "persist" before the new version is
# written, "snapshot" after it is durable but before it reaches the cache, "answer" after the
# engine finished, before the service answers.
PHASES = ("restore", "compute", "persist", "snapshot", "answer")
# Not a step phase: a publisher's server worker parks here before it loads a version into an
# inference server, so a test can kill the trainer in the middle of publishing.
PUBLISH = "publish"
# Not a step phase either: the background writer (``--durability async``) parks here before it
# writes a version, so a test can kill the trainer or fill the disk with versions not yet durable.
WRITE = "write"
OTHERS = (PUBLISH, WRITE)

# How often a parked worker looks for its release: holds are for tests, a millisecond scale is enough.
_POLL_SECONDS = 0.005


class PhaseHolds:
    """The hold files of one trainer: the trainer parks at them, a test arms, watches and releases."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _armed(self, phase: str) -> Path:
        if phase not in (*PHASES, *OTHERS):
            raise ValueError(f"unknown phase {phase!r}; one of {(*PHASES, *OTHERS)}")
        return self.directory / phase

    def _held(self, phase: str) -> Path:
        return self.directory / f"{phase}.held"

    # ---- the trainer's side ----------------------------------------------------------------
    def enable(self) -> PhaseHolds:
        self.directory.mkdir(parents=True, exist_ok=True)
        # A trainer killed while parked left its marker behind; nothing of this process is parked.
        for phase in (*PHASES, *OTHERS):
            self._held(phase).unlink(missing_ok=True)
        log.warning("test step holds are enabled in %s; never use this in production", self.directory)
        return self

    def at(self, phase: str) -> None:
        """Return at once unless ``phase`` is armed; else park until it is released."""
        armed = self._armed(phase)
        if not armed.exists():
            return
        held = self._held(phase)
        tmp = held.with_suffix(".tmp")
        tmp.write_text(str(os.getpid()))
        tmp.rename(held)  # appears whole, so a test that sees it can act at once
        log.warning("step held before %s until %s is removed", phase, armed)
        try:
            while armed.exists():
                time.sleep(_POLL_SECONDS)
        finally:
            held.unlink(missing_ok=True)

    # ---- the test's side -------------------------------------------------------------------
    def arm(self, phase: str) -> None:
        """The next step to reach ``phase`` parks there."""
        self.directory.mkdir(parents=True, exist_ok=True)
        # A marker left by a trainer killed while parked here must not pass for the next step's.
        self._held(phase).unlink(missing_ok=True)
        self._armed(phase).touch()

    def held(self, phase: str) -> bool:
        """A step is parked at ``phase`` now."""
        return self._held(phase).exists()

    def release(self, phase: str) -> None:
        self._armed(phase).unlink(missing_ok=True)


def at(holds: PhaseHolds | None, phase: str) -> None:
    """``holds.at(phase)`` where holds are configured; nothing otherwise."""
    if holds is not None:
        holds.at(phase)
