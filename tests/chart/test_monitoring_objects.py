"""The PodMonitor, ServiceMonitor and PrometheusRule decode strictly into the Prometheus Operator's types.

kubernetes-validate knows only built-in kinds, so tools/monitoring_types (a few lines of Go
against the Prometheus Operator's published API module, pinned in its go.mod) decodes each
monitoring.coreos.com/v1 object with unknown fields refused. Go's build cache makes reruns quick.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from tests.chart import charting

CHECKER = charting.ROOT / "tools" / "monitoring_types"


@pytest.fixture(scope="module")
def checker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = shutil.which("go")
    if go is None:
        raise RuntimeError("go is not installed: the README's prerequisites include Go")
    binary = tmp_path_factory.mktemp("monitoring-types") / "monitoring_types"
    built = subprocess.run(
        ["nice", "-n", "19", go, "build", "-o", str(binary), "."],
        cwd=CHECKER,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    return binary


def check(binary: Path, manifest: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary)], input=manifest, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    "values", [None, *charting.ci_value_files()], ids=lambda p: p.name if p else "defaults"
)
def test_monitoring_objects_match_the_prometheus_operator_types(checker: Path, values: Path | None) -> None:
    args = charting.template_args(
        values_files=[values] if values else [], api_versions=[charting.MONITORING_API]
    )
    rendered = charting.helm(*args)
    assert rendered.returncode == 0, rendered.stderr
    done = check(checker, rendered.stdout)
    assert done.returncode == 0, done.stderr
    expected = sum(
        rendered.stdout.count(f"\nkind: {kind}\n")
        for kind in ("PodMonitor", "ServiceMonitor", "PrometheusRule")
    )
    assert done.stdout.count("ok ") == expected
    if values is None:
        # All three kinds (a ServiceMonitor each for the operator and the gateway), so this check
        # is never vacuous.
        assert expected == 4


def test_an_unknown_field_is_refused(checker: Path) -> None:
    # The check is only worth something if a misspelt field fails it.
    rendered = charting.helm(*charting.template_args(sets=["prometheus.force=true"])).stdout
    broken = rendered.replace("targetLabel: pool", "targetLabels: pool")
    assert broken != rendered
    done = check(checker, broken)
    assert done.returncode == 1
    assert 'unknown field "targetLabels"' in done.stderr
