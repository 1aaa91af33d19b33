"""`promtool check metrics` on the /metrics of a live trainer and a live operator.

The trainer is the real `lorafleet-trainer serve` (builtin:tiny) after an init and a distill step
made through the operator's own trainer client, so both pages carry samples of every kind (counters,
gauges, histograms, the thread count), not only declared families.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from tests.chart import charting
from tests.chart.operator_side import OperatorSide
from tests.trainer.service import live, payloads

from lorafleet_api import adapters, wire

pytest.importorskip("lorafleet_trainer")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[live.LiveTrainer, OperatorSide]]:
    trainer = live.start_trainer(tmp_path_factory.mktemp("promtool"), args=["--threads", "1"])
    side = OperatorSide(token=None)
    try:
        body = wire.init_request(adapters.parse_spec({"spec": {"pool": "p"}}), 1)
        side.run(side.client.init(trainer.base_url, "team-a", "alice", body))
        step = trainer.client().post("/v1/adapters/team-a/alice/distill", json=payloads.distill_body())
        assert step.status_code == 200, step.text
        yield trainer, side
    finally:
        side.close()
        trainer.stop()


def check(page: str) -> None:
    done = charting.promtool_stdin(["check", "metrics"], page)
    assert done.returncode == 0, done.stdout + done.stderr


def test_trainer_metrics_pass_promtool(fleet: tuple[live.LiveTrainer, OperatorSide]) -> None:
    trainer, _ = fleet
    page = httpx.get(f"{trainer.base_url}/metrics", timeout=30).text
    assert "lorafleet_trainer_cpu_threads 1.0" in page  # --threads 1, as logged at start
    check(page)


def test_operator_metrics_pass_promtool(fleet: tuple[live.LiveTrainer, OperatorSide]) -> None:
    _, side = fleet
    page = httpx.get(f"http://127.0.0.1:{side.port}/metrics", timeout=30).text
    assert 'lorafleet_operator_trainer_requests_total{code="201",route="init"}' in page
    check(page)
