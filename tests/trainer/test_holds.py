"""Test-only step holds: a step parks at an armed phase, says so, and goes on when released.

Fault tests rely on this to land a fault at a known moment; these tests pin the protocol down on a
real engine, and check that a trainer listening beyond loopback refuses the setting.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.trainer.engine_helpers import samples

from lorafleet_local.polling import eventually
from lorafleet_trainer import settings
from lorafleet_trainer.engine.holds import PHASES, PhaseHolds
from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.learning.configs import LoraSpec

A = AdapterId("holds", "a")
LORA = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))


def test_holds_are_refused_unless_the_trainer_listens_on_loopback(tmp_path: Path) -> None:
    for host in ("127.0.0.1", "127.3.0.9", "::1", "localhost"):
        assert settings.load({"host": host, "test_hold_dir": str(tmp_path)}).test_hold_dir == tmp_path
    with pytest.raises(settings.SettingsError, match=r"^--test-hold-dir: .*tests only.*0\.0\.0\.0"):
        settings.load({"host": "0.0.0.0", "test_hold_dir": str(tmp_path)})
    assert settings.load({"host": "0.0.0.0"}).test_hold_dir is None


def test_an_unknown_phase_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown phase 'later'"):
        PhaseHolds(tmp_path).arm("later")


def test_a_marker_left_by_a_killed_trainer_never_passes_for_a_new_hold(tmp_path: Path) -> None:
    holds = PhaseHolds(tmp_path)
    for phase in ("compute", "answer"):
        (tmp_path / f"{phase}.held").write_text("4242")  # parked when it was killed -9
    holds.arm("compute")
    assert not holds.held("compute")  # re-arming for the next step forgets the dead one's marker
    holds.release("compute")
    PhaseHolds(tmp_path).enable()  # a restarted trainer has nothing parked
    assert not holds.held("answer")


@pytest.mark.parametrize(("phase", "durable_while_held"), [("persist", False), ("snapshot", True)])
def test_a_step_parks_at_the_armed_phase_until_released(
    make_engine: Callable[..., Any], tmp_path: Path, phase: str, durable_while_held: bool
) -> None:
    holds = PhaseHolds(tmp_path / "holds").enable()
    engine = make_engine(step_holds=holds)
    engine.init_adapter(A, LORA, 1)
    holds.arm(phase)
    results: list[Any] = []
    worker = threading.Thread(target=lambda: results.append(engine.distill(A, samples(1))))
    worker.start()
    eventually(f"the step to park before {phase}", lambda: holds.held(phase), timeout=60, interval=0.01)
    # Parked: the stored version is exactly what the phase implies, and nothing has answered.
    assert engine.store.read_meta(A).version == (1 if durable_while_held else 0)
    assert results == [] and worker.is_alive()
    assert [p for p in PHASES if holds.held(p)] == [phase]
    holds.release(phase)
    worker.join(60)
    assert not worker.is_alive() and results[0].version == 1
    assert not holds.held(phase)
    # Released holds stay released: the next step runs straight through.
    assert engine.distill(A, samples(2)).version == 2
