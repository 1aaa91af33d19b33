"""The operator's /metrics and /healthz server, its settings from the environment, and its CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from lorafleet_operator import settings
from lorafleet_operator.metrics import OperatorMetrics, serving


async def test_metrics_and_healthz_are_served() -> None:
    metrics = OperatorMetrics(CollectorRegistry())
    metrics.placements.inc()
    metrics.set_phase("ns", "a", "Ready")
    metrics.set_phase("ns", "b", "Pending")
    metrics.set_phase("ns", "b", "Ready")
    metrics.trainer_requests.labels(route="init", code="201").inc()
    async with serving(metrics, "127.0.0.1", 0) as port, httpx.AsyncClient() as client:
        health = await client.get(f"http://127.0.0.1:{port}/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    assert "lorafleet_operator_placements_total 1.0" in text
    assert 'lorafleet_operator_adapters{phase="Ready"} 2.0' in text
    assert 'lorafleet_operator_adapters{phase="Pending"} 0.0' in text
    assert 'lorafleet_operator_trainer_requests_total{code="201",route="init"} 1.0' in text
    for name in (
        "reschedules_total",
        "evictions_total",
        "reconcile_duration_seconds",
        "reconcile_errors_total",
    ):
        assert f"lorafleet_operator_{name}" in text


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_OPERATOR_TRAINER_PORT", "9090")
    monkeypatch.setenv("LORAFLEET_OPERATOR_NAMESPACES", "team-a, team-b")
    loaded = settings.load()
    assert loaded.trainer_port == 9090
    assert loaded.namespace_list == ["team-a", "team-b"]


def test_bad_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_OPERATOR_TRAINER_PORT", "70000")
    with pytest.raises(settings.SettingsError, match="LORAFLEET_OPERATOR_TRAINER_PORT"):
        settings.load()


def test_empty_token_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = tmp_path / "token"
    token.write_text("\n", encoding="utf-8")
    monkeypatch.setenv("LORAFLEET_OPERATOR_AUTH_TOKEN_FILE", str(token))
    with pytest.raises(ValueError, match="AUTH_TOKEN_FILE"):
        settings.load().auth_token()


def test_cli_exits_2_on_bad_settings() -> None:
    env = {"LORAFLEET_OPERATOR_RESYNC_SECONDS": "-1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "lorafleet_operator.cli"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "LORAFLEET_OPERATOR_RESYNC_SECONDS" in result.stderr


def test_pending_backoff_doubles_up_to_the_maximum() -> None:
    from lorafleet_operator import handlers

    config = settings.OperatorSettings(pending_backoff_seconds=2, pending_backoff_max_seconds=30)
    assert [handlers.backoff(config, retry) for retry in range(6)] == [2, 4, 8, 16, 30, 30]
