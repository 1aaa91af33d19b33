"""A real Prometheus server (the Debian package) scraping the trainer pods of the e2e cluster.

Targets come from a file_sd file that the tests rewrite from the pods' `status.podIP`, as the
Kubernetes service discovery of an in-cluster Prometheus would: Prometheus watches the file, so
pods that are replaced get scraped at their new addresses. Scrapes run every second so a test
sees a step's counters within a few seconds.
"""

from __future__ import annotations

import json
import shutil
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from tests.e2e import processes

SCRAPE_INTERVAL = "1s"


class Prometheus:
    """One Prometheus process with its own config, data directory and loopback port."""

    def __init__(self, workdir: Path, binary: str = "prometheus") -> None:
        found = shutil.which(binary)
        if found is None:
            raise RuntimeError(
                "prometheus is not installed: run `make system-deps` (Debian package prometheus)"
            )
        self.binary = found
        self.workdir = workdir
        self.targets_file = workdir / "targets.json"
        self.port = 0
        self.child: processes.Child | None = None

    def start(self, timeout: float = 60) -> Prometheus:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.set_targets({})
        config = {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
            "scrape_configs": [
                {
                    "job_name": "lorafleet-trainers",
                    "scrape_timeout": SCRAPE_INTERVAL,
                    "file_sd_configs": [{"files": [str(self.targets_file)], "refresh_interval": "5s"}],
                }
            ],
        }
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = processes.free_port()
        self.child = processes.Child(
            "prometheus",
            [
                self.binary,
                f"--config.file={self.workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            self.workdir / "prometheus.log",
        )
        processes.wait_until("prometheus /-/ready", self._ready, timeout, child=self.child)
        return self

    def _ready(self) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as resp:
            return bool(resp.status == 200)

    def set_targets(self, targets: dict[str, dict[str, str]]) -> None:
        """targets: "ip:port" -> labels (e.g. namespace, pod). Written atomically for the watcher."""
        groups = [{"targets": [address], "labels": labels} for address, labels in sorted(targets.items())]
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        tmp.replace(self.targets_file)

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as resp:
            answer = json.loads(resp.read())
        if answer.get("status") != "success":
            raise RuntimeError(f"PromQL {promql!r} failed: {answer}")
        return list(answer["data"]["result"])

    def value(self, promql: str) -> float | None:
        """The single value of a query that yields one series (None when it yields none)."""
        result = self.query(promql)
        if not result:
            return None
        if len(result) > 1:
            raise AssertionError(f"PromQL {promql!r} yielded {len(result)} series, expected one")
        return float(result[0]["value"][1])

    def up_targets(self) -> int:
        return len([r for r in self.query('up{job="lorafleet-trainers"} == 1')])

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()
            self.child = None
