"""Fused steps over real HTTP: distill steps of different adapters that wait together run as one
engine call (one fused step per LoRA shape), and each request still gets its own answer or error.

As in ``test_service_queue``, a first step parks at a test hold while the others queue behind it,
so which steps wait together is settled by the test, not by how fast the machine is.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from tests.trainer.service import live, payloads
from tests.trainer.service.test_service_queue import enqueue, held_step, init, start_trainer


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[live.LiveTrainer]:
    server = start_trainer(tmp_path_factory.mktemp("fusing"), model_cache, "--max-queue", "8")
    yield server
    server.stop()


def test_steps_waiting_together_run_fused_each_answered_its_own(trainer: live.LiveTrainer) -> None:
    first = init(trainer, "first")
    urls = [init(trainer, f"fused-{i}") for i in range(3)]
    bad = payloads.distill_body(n=2)
    bad["samples"][1]["response_token_ids"] = [5, 6, 7, 1 << 20]  # outside the vocabulary
    bodies = [payloads.distill_body(n=1), bad, payloads.distill_body(n=3, response_len=6)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        with held_step(pool, trainer, first) as running:
            waiting = [
                enqueue(pool, trainer, url, body, depth=i + 1)
                for i, (url, body) in enumerate(zip(urls, bodies, strict=True))
            ]
        answers = [f.result() for f in [running, *waiting]]
    assert [a.status_code for a in answers[:2]] == [200, 200] and answers[3].status_code == 200
    assert 400 <= answers[2].status_code < 500 and "vocabulary" in answers[2].text
    done = [answers[1].json(), answers[3].json()]
    assert [d["version"] for d in done] == [1, 1]
    # One fused step: both answers carry the same shared compute time, each its own loss and tokens.
    assert done[0]["timing_ms"]["compute"] == done[1]["timing_ms"]["compute"]
    assert done[0]["metrics"]["tokens_processed"] == 4 and done[1]["metrics"]["tokens_processed"] == 18
    states = [trainer.client().get(f"/v1/adapters/q/fused-{i}").json()["version"] for i in range(3)]
    assert states == [1, 0, 1]
    # The step metric says which steps were fused: the held one alone, then two that ran as one.
    scraped = trainer.metrics()
    assert scraped[("lorafleet_trainer_step_fused_adapters_count", ())] == 3
    assert scraped[("lorafleet_trainer_step_fused_adapters_sum", ())] == 1 + 2 + 2
