"""What the operator creates, and the CRDs themselves, are valid against Kubernetes' own OpenAPI
schemas (kubernetes-validate, strict: unknown fields are errors), for the cluster version the
control plane in tools/ runs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from lorafleet_api import pools
from lorafleet_operator import building
from lorafleet_operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[2]
K8S = "1.35"


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((ROOT / "examples" / name).read_text(encoding="utf-8")) if d]


def pool(name: str) -> pools.Pool:
    (doc,) = [d for d in docs(name) if d["kind"] == "TrainerPool"]
    doc["metadata"].update(namespace="team-a", uid="0b6f3c2e-1d2a-4f51-9a7e-3c1d2e4f5a6b")
    return pools.parse(doc)


@pytest.mark.parametrize("example", ["pool.yaml", "pool-gpu.yaml"])
def test_the_claims_next_to_the_example_pools_are_valid(example: str) -> None:
    (claim,) = [d for d in docs(example) if d["kind"] == "PersistentVolumeClaim"]
    kubernetes_validate.validate(claim, K8S, strict=True)
    assert pool(example).spec.storage.persistent_volume_claim is not None
    assert pool(example).spec.storage.persistent_volume_claim.claim_name == claim["metadata"]["name"]


@pytest.mark.parametrize("example", ["pool.yaml", "pool-gpu.yaml"])
def test_built_pod_and_service_are_valid_kubernetes_objects(example: str) -> None:
    settings = OperatorSettings()
    for obj in (
        building.build_pod(pool(example), 1, settings),
        building.build_service(pool(example), settings),
    ):
        kubernetes_validate.validate(obj, K8S, strict=True)


def test_the_check_does_catch_a_bad_pod() -> None:
    pod: dict[str, Any] = copy.deepcopy(building.build_pod(pool("pool.yaml"), 0, OperatorSettings()))
    pod["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, K8S, strict=True)


@pytest.mark.parametrize("path", sorted((ROOT / "crds").glob("*.yaml")), ids=lambda p: p.name)
def test_crds_are_valid_custom_resource_definitions(path: Path) -> None:
    kubernetes_validate.validate(yaml.safe_load(path.read_text(encoding="utf-8")), K8S, strict=True)
