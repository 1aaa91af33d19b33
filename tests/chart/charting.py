"""Runs the real helm and promtool binaries on the LoraFleet chart for the chart tests.

helm comes from `make kube-clients` (bin/helm), promtool from the Debian prometheus package.
Rendering goes through `helm template` exactly as a user would run it, pinned to the Kubernetes
version the project targets, and returns the manifests as parsed documents.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "lorafleet"
KUBE_VERSION = "1.35.0"
MONITORING_API = "monitoring.coreos.com/v1"


def tool(name: str, hint: str) -> str:
    """The path of a binary: the project's bin/ first, then PATH; a clear error when missing."""
    for candidate in (Path(os.environ.get("LORAFLEET_BIN_DIR", ROOT / "bin")) / name, ROOT / "bin" / name):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed: {hint}")
    return found


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    """Runs helm with a throwaway home so no user config or repository cache leaks in."""
    binary = tool("helm", "run `make kube-clients`")
    env = {
        **os.environ,
        "HELM_CACHE_HOME": "/tmp/lorafleet-helm/cache",
        "HELM_CONFIG_HOME": "/tmp/lorafleet-helm/config",
    }
    return subprocess.run([binary, *args], capture_output=True, text=True, env=env, timeout=120, check=False)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = tool("promtool", "run `make system-deps` (Debian package prometheus)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, check=False)


def promtool_stdin(args: Sequence[str], text: str) -> subprocess.CompletedProcess[str]:
    """promtool reading ``text`` on stdin (`promtool check metrics` takes a page that way)."""
    binary = tool("promtool", "run `make system-deps` (Debian package prometheus)")
    return subprocess.run(
        [binary, *args], input=text, capture_output=True, text=True, timeout=120, check=False
    )


def template_args(
    values_files: Sequence[Path] = (),
    sets: Sequence[str] = (),
    api_versions: Sequence[str] = (),
    kube_version: str = KUBE_VERSION,
) -> list[str]:
    args = ["template", "lf", str(CHART), "--namespace", "lorafleet", "--kube-version", kube_version]
    for path in values_files:
        args += ["--values", str(path)]
    for item in sets:
        args += ["--set", item]
    for api in api_versions:
        args += ["--api-versions", api]
    return args


def render(
    values_files: Sequence[Path] = (),
    sets: Sequence[str] = (),
    api_versions: Sequence[str] = (),
    kube_version: str = KUBE_VERSION,
) -> list[dict[str, Any]]:
    """`helm template` of the chart (CRDs excluded, as helm does), parsed; fails with helm's stderr."""
    done = helm(*template_args(values_files, sets, api_versions, kube_version))
    if done.returncode != 0:
        raise AssertionError(f"helm template failed: {done.stderr}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def ci_value_files() -> list[Path]:
    return sorted((CHART / "ci").glob("*.yaml"))


def kinds(docs: Sequence[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc.get("kind") == kind]


def component(docs: Sequence[dict[str, Any]], kind: str, name: str) -> list[dict[str, Any]]:
    """The documents of ``kind`` labelled ``app.kubernetes.io/component: name`` (operator, gateway...)."""
    return [
        d
        for d in kinds(docs, kind)
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == name
    ]


# What Grafana puts in place of its variables before a query reaches Prometheus ("All" filters).
DASHBOARD_SUBSTITUTIONS = {"$__rate_interval": "1m", "$pool": ".*", "$pod": ".*"}


def dashboard(name: str) -> dict[str, Any]:
    return dict(json.loads((CHART / "dashboards" / name).read_text(encoding="utf-8")))


def substitute(expr: str) -> str:
    """A panel's PromQL as Prometheus receives it from Grafana."""
    for variable, value in DASHBOARD_SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    if "$" in expr:
        raise AssertionError(f"unsubstituted variable in {expr}")
    return expr
