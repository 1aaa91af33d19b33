"""Boundary values of every LoRA and training field, through the real API server and a real trainer.

Each probe of tests/operator/field_probes.py (every limit, and one past it) is created with
`kubectl create --dry-run=server`, so the local API server runs the CRD's full validation, defaults
included, and nothing is stored. The API server's verdict must be the one the contract test's judge
gives; what it admits goes, as the API server returned it, through the operator's spec parsing to a
live trainer's init, which must accept it: admitted means trainable. The one refusal allowed is the
check no schema can make: a target module the loaded model does not have.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from tests.operator.field_probes import ROOT, crd_admits, fields, probes
from tests.trainer.service import live

from lorafleet_api import adapters, wire
from lorafleet_local.kube import Kube

pytestmark = pytest.mark.e2e

NAMESPACE = "field-boundaries"
CASES = [
    pytest.param(index, sec, name, value, id=f"{sec}.{name}={str(value)[:40]}")
    for index, (sec, name, value) in enumerate(
        (sec, name, value) for sec, name, sub in fields() for value in probes(sec, name, sub)
    )
]


@pytest.fixture(scope="module")
def api(kube: Kube) -> Kube:
    kube.kubectl("apply", "-f", str(ROOT / "crds"))
    kube.kubectl(
        "wait", "--for", "condition=established", "--timeout", "120s", "crd/loraadapters.lorafleet.io"
    )
    if not kube.exists("namespace", NAMESPACE):
        kube.kubectl("create", "namespace", NAMESPACE)
    return kube


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[live.LiveTrainer]:
    server = live.start_trainer(tmp_path_factory.mktemp("boundaries"))
    try:
        yield server
    finally:
        server.stop()


def manifest(index: int, sec: str, name: str, value: Any) -> dict[str, Any]:
    return {
        "apiVersion": "lorafleet.io/v1alpha1",
        "kind": "LoraAdapter",
        "metadata": {"name": f"probe-{index}", "namespace": NAMESPACE},
        "spec": {"pool": "p", sec: {name: value}},
    }


@pytest.mark.parametrize(("index", "sec", "name", "value"), CASES)
def test_admitted_means_trainable(
    api: Kube, trainer: live.LiveTrainer, index: int, sec: str, name: str, value: Any
) -> None:
    doc = manifest(index, sec, name, value)
    done = api.kubectl(
        "create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(doc), check=False
    )
    admitted = done.returncode == 0
    assert admitted == crd_admits(sec, name, value), done.stderr or done.stdout
    if not admitted:
        assert f"spec.{sec}" in done.stderr, done.stderr  # the refusal names the field
        return
    stored = json.loads(done.stdout)  # with the CRD's defaults applied by the API server
    body = wire.init_request(adapters.parse_spec(stored), 1).model_dump(mode="json", exclude_none=True)
    answer = trainer.client().put(f"/v1/adapters/{NAMESPACE}/probe-{index}", json=body)
    if answer.status_code == 422 and "is not a linear layer" in answer.text:
        return  # a module name the CRD allows but builtin:tiny lacks: only the loaded model knows
    assert answer.status_code in (200, 201), f"admitted but not trainable: {body} -> {answer.text}"


def test_probes_reach_a_trainable_list_of_real_modules() -> None:
    """At least one admitted targetModules probe names real modules, so the trainer path is exercised."""
    admitted = [v for _, sec, name, v in (c.values for c in CASES)
                if name == "targetModules" and crd_admits(sec, name, v)]  # fmt: skip
    assert ["q_proj"] in admitted and ["q_proj", "v_proj"] in admitted
