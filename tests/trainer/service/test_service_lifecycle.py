"""Start-up over real HTTP: /readyz stays 503 until the model loads, and a model that cannot load
keeps it 503 and fails /healthz (so Kubernetes restarts the pod) while /v1 answers 503."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
from tests.trainer.service import live, payloads


def test_a_model_that_cannot_load_is_never_ready(tmp_path: Path) -> None:
    port = live.free_port()
    log = (tmp_path / "trainer.log").open("wb")
    process = subprocess.Popen(
        [
            *live.trainer_command(),
            "serve",
            "--base-model",
            str(tmp_path / "no-such-model"),
            "--port",
            str(port),
            "--storage",
            str(tmp_path / "adapters"),
            "--device",
            "cpu",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, (tmp_path / "trainer.log").read_text()
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
        assert not (tmp_path / "adapters" / "a" / "b").exists()
    finally:
        process.terminate()
        process.wait(60)
        log.close()
