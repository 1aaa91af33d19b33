"""A real trainer server for tests: `lorafleet-trainer serve` as a subprocess on 127.0.0.1.

Reusable by any suite (service, chart, e2e): ``start_trainer(workdir, ...)`` picks a free port,
starts the console script with its own storage directory, waits for ``/readyz`` and returns a
:class:`LiveTrainer` with an ``httpx`` client; ``stop()`` sends SIGTERM and waits. The server's
output goes to ``<workdir>/trainer.log``, whose tail is shown when start-up fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from lorafleet_local import processes

READY_TIMEOUT = 240.0


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, keyed by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def trainer_command() -> list[str]:
    """The installed console script next to this interpreter (the module as a fallback)."""
    script = Path(sys.executable).parent / "lorafleet-trainer"
    return [str(script)] if script.exists() else [sys.executable, "-m", "lorafleet_trainer.cli"]


@dataclass
class LiveTrainer:
    process: subprocess.Popen[bytes]
    port: int
    storage: Path
    log_path: Path
    token: str | None = None
    clients: list[httpx.Client] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, token: str | None = None, timeout: float = 120.0) -> httpx.Client:
        """A client for this server, sending ``token`` (default: the server's own) as a bearer."""
        token = self.token if token is None else token
        headers = {"authorization": f"Bearer {token}"} if token else {}
        c = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self.clients.append(c)
        return c

    def metrics(self) -> Samples:
        """Every sample of /metrics, keyed by (name, sorted labels)."""
        return parse_metrics(httpx.get(f"{self.base_url}/metrics", timeout=30).text)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait, SIGKILL if it hangs; returns the exit status."""
        for c in self.clients:
            c.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return int(self.process.returncode)


def launch_trainer(
    workdir: Path,
    *,
    base_model: str = "builtin:tiny",
    token: str | None = None,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    model_cache_dir: Path | None = None,
) -> LiveTrainer:
    """Start a trainer serving ``base_model`` with storage under ``workdir``; do not wait for it."""
    workdir.mkdir(parents=True, exist_ok=True)
    storage = workdir / "adapters"
    port = processes.free_port()
    command = [
        *trainer_command(),
        "serve",
        "--base-model",
        base_model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--storage",
        str(storage),
        "--device",
        "cpu",
        "--log-level",
        "warning",
    ]
    if model_cache_dir is not None:
        command += ["--model-cache-dir", str(model_cache_dir)]
    if token is not None:
        token_file = workdir / "token"
        token_file.write_text(token + "\n")
        command += ["--auth-token-file", str(token_file)]
    command += list(args)
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_TRAINER_")}
    child_env.update(env or {})
    log_path = workdir / "trainer.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_env)
    return LiveTrainer(process=process, port=port, storage=storage, log_path=log_path, token=token)


def start_trainer(
    workdir: Path,
    *,
    base_model: str = "builtin:tiny",
    token: str | None = None,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    model_cache_dir: Path | None = None,
    ready_timeout: float = READY_TIMEOUT,
) -> LiveTrainer:
    """Launch a trainer (see ``launch_trainer``) and wait until /readyz answers 200."""
    live = launch_trainer(
        workdir, base_model=base_model, token=token, args=args, env=env, model_cache_dir=model_cache_dir
    )
    process = live.process
    deadline = time.monotonic() + ready_timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"trainer exited with {process.returncode}:\n{live.log_tail()}")
        try:
            if httpx.get(f"{live.base_url}/readyz", timeout=2).status_code == 200:
                return live
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            live.stop()
            raise RuntimeError(f"trainer not ready after {ready_timeout:.0f} s:\n{live.log_tail()}")
        time.sleep(0.1)
