"""A real trainer server for tests: `lorafleet-trainer serve` as a subprocess on 127.0.0.1.

Reusable by any suite (service, chart, e2e): ``start_trainer(workdir, ...)`` picks a free port,
starts the console script with its own storage directory, waits for ``/readyz`` and returns a
:class:`LiveTrainer` with an ``httpx`` client; ``stop()`` sends SIGTERM and waits. The process is a
``lorafleet_local.processes.Child``, so it dies with the test run; its output goes to
``<workdir>/trainer.log``, whose tail is shown when start-up fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from lorafleet_local import polling, processes

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
    child: processes.Child
    port: int
    storage: Path
    token: str | None = None
    clients: list[httpx.Client] = field(default_factory=list)

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.child.popen

    @property
    def log_path(self) -> Path:
        return self.child.log_path

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
        return self.child.log_tail(lines) or "(no log)"

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait, SIGKILL if it hangs; returns the exit status."""
        for c in self.clients:
            c.close()
        self.child.stop(grace=timeout)
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
    log_path.unlink(missing_ok=True)  # a restarted trainer's log starts afresh
    child = processes.Child("lorafleet-trainer", command, log_path, env=child_env)
    return LiveTrainer(child=child, port=port, storage=storage, token=token)


def start_trainer(workdir: Path, *, ready_timeout: float = READY_TIMEOUT, **launch: Any) -> LiveTrainer:
    """``launch_trainer(workdir, **launch)``, then wait until /readyz answers 200."""
    live = launch_trainer(workdir, **launch)
    try:
        polling.eventually(
            "the trainer's /readyz",
            lambda: httpx.get(f"{live.base_url}/readyz", timeout=2).status_code == 200,
            ready_timeout,
            0.1,
            child=live.child,
        )
    except TimeoutError:
        live.stop()
        raise
    return live
