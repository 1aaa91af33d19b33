"""Start-up over real HTTP: /readyz stays 503 until the model loads, and a model that cannot load
keeps it 503 and fails /healthz (so Kubernetes restarts the pod) while /v1 answers 503."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from tests.trainer.service import live, payloads


def test_a_model_that_cannot_load_is_never_ready(tmp_path: Path) -> None:
    server = live.launch_trainer(tmp_path, base_model=str(tmp_path / "no-such-model"))
    base = server.base_url
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.process.poll() is None, server.log_tail()
            try:
                health = httpx.get(f"{base}/healthz", timeout=5)
                ready = httpx.get(f"{base}/readyz", timeout=5)
            except httpx.TransportError:
                time.sleep(0.2)
                continue
            assert ready.status_code == 503  # never ready, before or after the failed load
            if health.status_code == 500:
                break
            assert time.monotonic() < deadline, "the failed load never showed on /healthz"
            time.sleep(0.2)
        assert health.json()["error"].startswith("base_model: ")
        assert "failed to load" in ready.json()["error"]
        r = httpx.put(f"{base}/v1/adapters/a/b", json=payloads.init_body(), timeout=10)
        assert r.status_code == 503
        assert not (server.storage / "a" / "b").exists()
    finally:
        server.stop()
