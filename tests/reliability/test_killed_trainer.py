"""Killed trainer: kill -9 a real `lorafleet-trainer serve` mid-stream, restart, lose nothing.

Each kill lands at a moment the test chose (a step parked before a phase, or just answered). After
every restart the adapter loads, its version is what that moment implies (the answered count, or
one more when the kill fell after the write), its files are whole; at the end its weights and AdamW
moments equal a replay of the applied steps in a fresh engine and the stored adapter loads with
PEFT. The fast version kills at the three outcomes' moments; the chaos suite at every moment four
times, in a seeded order, and prints the tally for the report.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from tests.reliability import killing, replay, stored
from tests.trainer.service import live, payloads

from lorafleet_local.polling import eventually
from lorafleet_trainer.engine.holds import WRITE, PhaseHolds
from lorafleet_trainer.engine.storage import AdapterStore
from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.models import models

# PEFT's loader reads a deprecated transformers property; the warning is theirs, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def _campaign(tmp_path: Path, model_cache: Path, moments: list[str], seed: int) -> None:
    c, server = killing.run(tmp_path / "trainer", model_cache, moments, seed=seed)
    try:
        assert c.kills == len(moments)
        served = replay.stored_tensors(server.storage)
        replayed = replay.replay(tmp_path / "replay", model_cache, c.applied)
        diff = replay.max_difference(served, replayed)
        assert diff < replay.TOLERANCE, f"stored weights differ from the replay by {diff}"
        assert served.step == len(c.applied)

        base, _ = models.load("builtin:tiny", model_cache)
        peft_model = PeftModel.from_pretrained(base, str(server.storage / killing.NAMESPACE / killing.NAME))
        loaded = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
        assert sorted(loaded) == sorted(served.weights)
        for k, t in loaded.items():
            torch.testing.assert_close(t, served.weights[k])
        assert stored.unsafe_files(server.storage) == []
    finally:
        server.stop()
    print(
        f"\nkilled-trainer seed={seed}: kills={c.kills} before-write={c.killed_before_write} "
        f"after-write={c.killed_after_write} answered-first={c.answered_before_kill} "
        f"answered={c.acked} applied={len(c.applied)} replay-max-diff={diff:.2e} "
        f"restart-median={sorted(c.restarts_s)[len(c.restarts_s) // 2]:.1f}s"
    )


def test_three_kills_lose_no_answered_step(tmp_path: Path, model_cache: Path) -> None:
    _campaign(tmp_path, model_cache, ["compute", "snapshot", killing.ANSWERED], seed=7)


@pytest.mark.chaos
@pytest.mark.parametrize("seed", [11])
def test_twenty_four_kills_lose_no_answered_step(tmp_path: Path, model_cache: Path, seed: int) -> None:
    moments = list(killing.MOMENTS) * 4
    random.Random(seed).shuffle(moments)
    _campaign(tmp_path, model_cache, moments, seed=seed)


def _async_trainer(workdir: Path, model_cache: Path) -> live.LiveTrainer:
    args = ["--test-hold-dir", str(workdir / "holds"), "--durability", "async"]
    return live.start_trainer(workdir, token=killing.TOKEN, model_cache_dir=model_cache, args=args)


def _state(server: live.LiveTrainer) -> dict[str, Any]:
    r = server.client().get(killing.ROUTE)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_async_kill_loses_only_versions_past_durable_version(tmp_path: Path, model_cache: Path) -> None:
    """Durability async: answered versions the writer had not made durable die with the process,
    and only those; the restart resumes from the durable version, whole."""
    workdir = tmp_path / "trainer"
    holds = PhaseHolds(workdir / "holds")
    server = _async_trainer(workdir, model_cache)
    try:
        client = server.client()
        assert client.put(killing.ROUTE, json=payloads.init_body(epoch=1)).status_code in (200, 201)
        assert client.post(f"{killing.ROUTE}/distill", json=killing.body(0)).status_code == 200
        eventually("v1 to be durable", lambda: _state(server)["durable_version"] == 1, timeout=60)
        holds.arm(WRITE)
        answers = [client.post(f"{killing.ROUTE}/distill", json=killing.body(seed)) for seed in (1, 2, 3)]
        eventually("the writer to park before writing v2", lambda: holds.held(WRITE), timeout=60)
        assert [(a.status_code, a.json()["version"]) for a in answers] == [(200, 2), (200, 3), (200, 4)]
        assert all(a.json()["durable_version"] == 1 for a in answers)
        state = _state(server)
        assert (state["version"], state["durable_version"], state["durable_error"]) == (4, 1, None)
        lag = server.metrics()[("lorafleet_trainer_durable_lag_versions", ())]
        assert lag == 3.0
        server.process.kill()  # with v2 being written and v4 waiting (v3 coalesced into it)
        server.process.wait(30)
    finally:
        server.stop()
    holds.release(WRITE)

    server = _async_trainer(workdir, model_cache)
    try:
        state = _state(server)
        assert (state["version"], state["durable_version"]) == (1, 1)  # exactly what was durable
        stored.assert_whole(server.storage, killing.NAMESPACE, killing.NAME, 1)
        diff = replay.max_difference(
            replay.stored_tensors(server.storage), replay.replay(tmp_path / "replay", model_cache, [0])
        )
        assert diff < replay.TOLERANCE, f"the durable version differs from a replay of its steps by {diff}"
        r = server.client().post(f"{killing.ROUTE}/distill", json=killing.body(4))
        assert r.status_code == 200 and r.json()["version"] == 2, r.text
    finally:
        server.stop()


def test_async_graceful_shutdown_writes_every_committed_version(tmp_path: Path, model_cache: Path) -> None:
    """SIGTERM with versions waiting for the writer: they are all durable before the process exits."""
    workdir = tmp_path / "trainer"
    holds = PhaseHolds(workdir / "holds")
    server = _async_trainer(workdir, model_cache)
    try:
        client = server.client()
        assert client.put(killing.ROUTE, json=payloads.init_body(epoch=1)).status_code in (200, 201)
        holds.arm(WRITE)
        for seed in (0, 1):
            assert client.post(f"{killing.ROUTE}/distill", json=killing.body(seed)).status_code == 200
        eventually("the writer to park before writing v1", lambda: holds.held(WRITE), timeout=60)
        assert _state(server)["durable_version"] == 0
        server.process.terminate()
        holds.release(WRITE)  # the shutdown's flush proceeds
        server.process.wait(60)
    finally:
        server.stop()
    assert AdapterStore(server.storage).read_meta(AdapterId(killing.NAMESPACE, killing.NAME)).version == 2
    stored.assert_whole(server.storage, killing.NAMESPACE, killing.NAME, 2)
