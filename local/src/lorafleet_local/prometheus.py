"""A real Prometheus server (the Debian package) next to the local cluster: the demo reads its figures
from it, and every test suite that checks metrics uses this one class.

It listens on 127.0.0.1 only, keeps its data in its own work directory, and scrapes and evaluates
rules every second so a step's counters show within a few seconds. The demo and the e2e tests scrape
the trainer pods through a file_sd file rewritten from the pods' `status.podIP` (Prometheus watches it,
as Kubernetes service discovery would in a cluster); the chart suite gives static targets with the
labels the chart's PodMonitor relabelings would add (`static_jobs`) and loads the alert rules.
"""

from __future__ import annotations

import json
import math
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from lorafleet_local import polling, processes

INTERVAL = "1s"
E2E_JOB = "lorafleet-trainers"


def static_jobs(jobs: Mapping[str, tuple[str, Mapping[str, str]]]) -> list[dict[str, Any]]:
    """Scrape configs for job name -> ("host:port", target labels)."""
    return [
        {"job_name": job, "static_configs": [{"targets": [address], "labels": dict(labels)}]}
        for job, (address, labels) in jobs.items()
    ]


class Prometheus:
    """One Prometheus process: start() it with scrape configs, query() it, stop() it."""

    def __init__(self, workdir: Path, rule_files: Sequence[Path] = ()) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError(
                "prometheus is not installed: run `make system-deps` (Debian package prometheus)"
            )
        self.binary = binary
        self.workdir = workdir
        self.rule_files = [str(path) for path in rule_files]
        self.targets_file = workdir / "targets.json"
        self.port = 0
        self.child: processes.Child | None = None

    def start(
        self, scrape_configs: Sequence[Mapping[str, Any]] | None = None, timeout: float = 60
    ) -> Prometheus:
        """Start scraping ``scrape_configs``; by default the e2e job fed by ``set_targets``."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if scrape_configs is None:
            self.set_targets({})
            scrape_configs = [
                {
                    "job_name": E2E_JOB,
                    "file_sd_configs": [{"files": [str(self.targets_file)], "refresh_interval": "5s"}],
                }
            ]
        config = {
            "global": {
                "scrape_interval": INTERVAL,
                "scrape_timeout": INTERVAL,
                "evaluation_interval": INTERVAL,
            },
            "rule_files": self.rule_files,
            "scrape_configs": [dict(c) for c in scrape_configs],
        }
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.port = processes.free_port()
        self.child = processes.Child(
            "prometheus",
            [
                self.binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            self.workdir / "prometheus.log",
        )
        polling.eventually(
            "prometheus /-/ready", lambda: self._get("/-/ready", raw=True), timeout, 0.2, child=self.child
        )
        return self

    def set_targets(self, targets: dict[str, dict[str, str]]) -> None:
        """targets: "ip:port" -> labels (e.g. namespace, pod). Written atomically for the watcher."""
        groups = [{"targets": [address], "labels": labels} for address, labels in sorted(targets.items())]
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        tmp.replace(self.targets_file)

    def _get(self, path: str, params: Mapping[str, str] | None = None, raw: bool = False) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = reply.read()
        return body if raw else json.loads(body)

    def _result(self, path: str, params: Mapping[str, str]) -> list[dict[str, Any]]:
        """The ``data.result`` of a query API call; a PromQL error raises naming the query."""
        try:
            answer = self._get(path, params)
        except urllib.error.HTTPError as error:
            raise AssertionError(
                f"PromQL {params['query']!r} was refused: {error.read().decode()}"
            ) from error
        assert answer["status"] == "success", answer
        return list(answer["data"]["result"])

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The result vector of an instant query."""
        return self._result("/api/v1/query", {"query": promql})

    def query_range(self, promql: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """The result matrix of a range query (one entry per series, with its `values`)."""
        params = {"query": promql, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        return self._result("/api/v1/query_range", params)

    def value(self, promql: str) -> float | None:
        """The single value of a query that yields one series (None when it yields none)."""
        result = self.query(promql)
        if not result:
            return None
        if len(result) > 1:
            raise AssertionError(f"PromQL {promql!r} yielded {len(result)} series, expected one")
        return float(result[0]["value"][1])

    def finite_values(self, promql: str) -> list[float]:
        return [float(v) for v in (s["value"][1] for s in self.query(promql)) if math.isfinite(float(v))]

    def targets_up(self) -> dict[str, bool]:
        return {s["metric"]["job"]: s["value"][1] == "1" for s in self.query("up")}

    def up_targets(self) -> int:
        return len(self.query(f'up{{job="{E2E_JOB}"}} == 1'))

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule with its health, last error and last evaluation time."""
        groups = self._get("/api/v1/rules")["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def log_tail(self) -> str:
        return self.child.log_tail() if self.child is not None else ""

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()
            self.child = None
