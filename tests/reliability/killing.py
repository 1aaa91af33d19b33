"""A kill -9 campaign against one live trainer: a seeded stream of steps, each kill at a known moment.

Each round sends a few whole steps, then one more that is killed at a moment the campaign chose:
parked by the trainer's step holds before one of its phases (``lorafleet_trainer.engine.holds``), or just
after its answer arrived. The moment decides the outcome: before ``persist`` nothing is written,
from ``snapshot`` on the new version is durable but unanswered, after the answer it is both. The
trainer is restarted on the same storage and the adapter's stored version must be exactly that.
The ledger of applied steps (their sample seeds) is what a replay in a fresh engine must reproduce.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tests.reliability import stored
from tests.trainer.engine_helpers import sample_dict
from tests.trainer.service import live, payloads

from lorafleet_local.polling import eventually
from lorafleet_trainer.engine.holds import PHASES, PhaseHolds

TOKEN = "chaos-token-7c2e"
NAMESPACE, NAME = "chaos", "killed"
ROUTE = f"/v1/adapters/{NAMESPACE}/{NAME}"
# Explicit per-step settings so a replay needs nothing from the server's defaults.
TRAINING: dict[str, Any] = {"learning_rate": 1e-2, "teacher_top_k": 16}
SAMPLES_PER_STEP = 2

# Every moment a kill can land at, and what it leaves: a step parked before a phase up to
# "persist" has written nothing; parked at "snapshot" or "answer" it is durable, unanswered.
ANSWERED = "answered"
MOMENTS = (*PHASES, ANSWERED)
_DURABLE_FROM = PHASES.index("snapshot")


def outcome_at(moment: str) -> str:
    if moment == ANSWERED:
        return "answered"
    return "after-write" if PHASES.index(moment) >= _DURABLE_FROM else "before-write"


def step_samples(seed: int) -> list[dict[str, Any]]:
    return [sample_dict(seed * 10 + i) for i in range(SAMPLES_PER_STEP)]


@dataclass
class Campaign:
    """What happened: the applied steps' seeds and how each kill landed."""

    applied: list[int] = field(default_factory=list)
    acked: int = 0  # steps answered 200
    killed_before_write: int = 0  # stored version == answered steps
    killed_after_write: int = 0  # stored version == answered steps + 1 (no answer came)
    answered_before_kill: int = 0  # killed once the answer had arrived
    restarts_s: list[float] = field(default_factory=list)

    @property
    def kills(self) -> int:
        return self.killed_before_write + self.killed_after_write + self.answered_before_kill


def body(seed: int) -> dict[str, Any]:
    return {"samples": step_samples(seed), "training": TRAINING}


def _stored_version(server: live.LiveTrainer) -> int:
    r = server.client().get(ROUTE)
    assert r.status_code == 200, r.text
    return int(r.json()["version"])


def _step(client: httpx.Client, seed: int) -> httpx.Response:
    return client.post(f"{ROUTE}/distill", json=body(seed))


def _holds(workdir: Path) -> PhaseHolds:
    return PhaseHolds(workdir / "holds")


def _start(workdir: Path, model_cache: Path) -> live.LiveTrainer:
    args = ["--test-hold-dir", str(_holds(workdir).directory)]
    return live.start_trainer(workdir, token=TOKEN, model_cache_dir=model_cache, args=args)


def run(workdir: Path, model_cache: Path, moments: list[str], seed: int) -> tuple[Campaign, live.LiveTrainer]:
    """One kill per entry of ``moments``; returns the ledger and the (restarted, running) server."""
    rng = random.Random(seed)
    c = Campaign()
    holds = _holds(workdir)
    server = _start(workdir, model_cache)
    r = server.client().put(ROUTE, json=payloads.init_body(epoch=1))
    assert r.status_code in (200, 201), r.text
    next_seed = 0
    for moment in moments:
        client = server.client()
        for _ in range(rng.randint(1, 3)):
            r = _step(client, next_seed)
            assert r.status_code == 200, r.text
            assert r.json()["version"] == len(c.applied) + 1
            c.applied.append(next_seed)
            c.acked += 1
            next_seed += 1

        answer: list[httpx.Response] = []

        def send(s: int = next_seed, cl: httpx.Client = client, out: list[httpx.Response] = answer) -> None:
            # A transport error is the expected outcome of a kill mid-request.
            with contextlib.suppress(httpx.TransportError):
                out.append(_step(cl, s))

        sender = threading.Thread(target=send, daemon=True)
        if moment != ANSWERED:
            holds.arm(moment)
        sender.start()
        if moment == ANSWERED:
            sender.join(120)
        else:
            eventually(f"the step to park before {moment}", lambda m=moment: holds.held(m), timeout=120)
        server.process.kill()
        server.process.wait(30)
        sender.join(60)
        assert not sender.is_alive(), "the client hung on a killed server"
        server.stop()
        if moment != ANSWERED:
            holds.release(moment)

        t0 = time.perf_counter()
        server = _start(workdir, model_cache)
        c.restarts_s.append(time.perf_counter() - t0)
        version = _stored_version(server)
        stored.assert_whole(server.storage, NAMESPACE, NAME, version)
        expected = outcome_at(moment)
        if expected == "answered":
            assert answer and answer[0].status_code == 200, answer
            assert answer[0].json()["version"] == version == len(c.applied) + 1
            c.applied.append(next_seed)
            c.acked += 1
            c.answered_before_kill += 1
        elif expected == "after-write":
            assert not answer, f"a step parked before {moment} was answered"
            assert version == len(c.applied) + 1, f"killed before {moment}: stored v{version}"
            c.applied.append(next_seed)  # applied and durable, but the answer died with the pod
            c.killed_after_write += 1
        else:
            assert not answer, f"a step parked before {moment} was answered"
            assert version == len(c.applied), f"killed before {moment}: stored v{version}"
            c.killed_before_write += 1
        next_seed += 1
    return c, server
