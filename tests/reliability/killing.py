"""A kill -9 campaign against one live trainer: a seeded stream of steps, killed at random moments.

Each round sends a few whole steps, then one more that is killed after a random delay (drawn from
0 to 1.2x the recent step latency, so kills land before, during and after the write). The trainer
is restarted on the same storage and the adapter's stored version must be the count of answered
steps, or one more when the kill came after the write but before the answer. The ledger of applied
steps (their sample seeds) is what a replay in a fresh engine must reproduce exactly.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tests.reliability import stored
from tests.trainer.engine_helpers import sample_dict
from tests.trainer.service import live, payloads

TOKEN = "chaos-token-7c2e"
NAMESPACE, NAME = "chaos", "killed"
ROUTE = f"/v1/adapters/{NAMESPACE}/{NAME}"
# Explicit per-step settings so a replay needs nothing from the server's defaults.
TRAINING: dict[str, Any] = {"learning_rate": 1e-2, "teacher_top_k": 16}
SAMPLES_PER_STEP = 2


def step_samples(seed: int) -> list[dict[str, Any]]:
    return [sample_dict(seed * 10 + i) for i in range(SAMPLES_PER_STEP)]


@dataclass
class Campaign:
    """What happened: the applied steps' seeds and how each kill landed."""

    applied: list[int] = field(default_factory=list)
    acked: int = 0  # steps answered 200
    killed_before_write: int = 0  # stored version == answered steps
    killed_after_write: int = 0  # stored version == answered steps + 1 (no answer came)
    answered_before_kill: int = 0  # the answer raced ahead of the kill
    latencies: list[float] = field(default_factory=list)
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


def _start(workdir: Path, model_cache: Path) -> live.LiveTrainer:
    return live.start_trainer(workdir, token=TOKEN, model_cache_dir=model_cache)


def run(workdir: Path, model_cache: Path, kills: int, seed: int) -> tuple[Campaign, live.LiveTrainer]:
    """Run ``kills`` rounds; returns the ledger and the (restarted, running) server."""
    rng = random.Random(seed)
    c = Campaign()
    server = _start(workdir, model_cache)
    r = server.client().put(ROUTE, json=payloads.init_body(epoch=1))
    assert r.status_code in (200, 201), r.text
    next_seed = 0
    for _ in range(kills):
        client = server.client()
        for _ in range(rng.randint(1, 3)):
            t0 = time.perf_counter()
            r = _step(client, next_seed)
            c.latencies.append(time.perf_counter() - t0)
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
        sender.start()
        time.sleep(rng.uniform(0.0, 1.2 * statistics.median(c.latencies[-3:])))
        server.process.kill()
        server.process.wait(30)
        sender.join(60)
        assert not sender.is_alive(), "the client hung on a killed server"
        server.stop()

        t0 = time.perf_counter()
        server = _start(workdir, model_cache)
        c.restarts_s.append(time.perf_counter() - t0)
        version = _stored_version(server)
        stored.assert_whole(server.storage, NAMESPACE, NAME, version)
        if answer and answer[0].status_code == 200:
            assert answer[0].json()["version"] == version == len(c.applied) + 1
            c.applied.append(next_seed)
            c.acked += 1
            c.answered_before_kill += 1
        elif version == len(c.applied) + 1:
            c.applied.append(next_seed)  # applied and durable, but the answer died with the pod
            c.killed_after_write += 1
        else:
            assert version == len(c.applied), f"stored v{version}, {len(c.applied)} steps answered"
            c.killed_before_write += 1
        next_seed += 1
    return c, server
