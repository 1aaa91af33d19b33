"""values.schema.json refuses bad values before anything renders, with helm naming the field."""

from __future__ import annotations

import pytest
from tests.chart import charting

# (--set argument, the JSON pointer helm names, a fragment of its reason)
BAD_VALUES = [
    ("rbac.scope=world", "/rbac/scope", "one of"),
    ("trainerPool.cache.capacity=lots", "/trainerPool/cache/capacity", "pattern"),
    ("trainerPool.gpuResidency=sometimes", "/trainerPool/gpuResidency", "one of"),
    ("trainerPool.replicas=-1", "/trainerPool/replicas", "minimum"),
    ("trainerPort=0", "/trainerPort", "minimum"),
    ("operator.metricsPort=70000", "/operator/metricsPort", "maximum"),
    ("rbac.namespaces={Team_A}", "/rbac/namespaces/0", "pattern"),
    ("trainerAuth.existingSecret=Not A Name", "/trainerAuth/existingSecret", "pattern"),
    ("prometheus.podMonitor.interval=often", "/prometheus/podMonitor/interval", "pattern"),
    ("operator.image.pullPolicy=Sometimes", "/operator/image/pullPolicy", "one of"),
    ("operator.replicaCount=2", "/operator", "additional properties 'replicaCount'"),
    ("trainerPool.enabled=yes", "/trainerPool/enabled", "boolean"),
]


@pytest.mark.parametrize(("setting", "pointer", "reason"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_value_is_refused_naming_the_field(setting: str, pointer: str, reason: str) -> None:
    done = charting.helm(*charting.template_args(sets=[setting]))
    assert done.returncode != 0, f"{setting} rendered:\n{done.stdout[:400]}"
    assert "values don't meet the specifications of the schema" in done.stderr
    assert f"at '{pointer}'" in done.stderr, done.stderr
    assert reason in done.stderr, done.stderr
    assert not done.stdout.strip(), "a refused install must render nothing"


def test_defaults_and_ci_sets_satisfy_the_schema() -> None:
    for values in [None, *charting.ci_value_files()]:
        done = charting.helm(*charting.template_args(values_files=[values] if values else []))
        assert done.returncode == 0, f"{values}: {done.stderr}"
