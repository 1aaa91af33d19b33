"""The CRDs: examples/ validate against their schemas, examples/invalid/ do not, conventions hold.

The API server validates with the OpenAPI v3 schema in each CRD; jsonschema's Draft 4 validator
reads the same structural subset (boolean ``exclusiveMinimum``, ``enum``, ``required``, bounds),
so a manifest rejected here is rejected by ``kubectl apply``. CEL rules are checked by the e2e tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRDS = {
    "TrainerPool": ROOT / "crds/lorafleet.io_trainerpools.yaml",
    "LoraAdapter": ROOT / "crds/lorafleet.io_loraadapters.yaml",
}


def crd(kind: str) -> dict[str, Any]:
    return yaml.safe_load(CRDS[kind].read_text(encoding="utf-8"))


def validator(kind: str) -> jsonschema.Draft4Validator:
    (version,) = crd(kind)["spec"]["versions"]
    return jsonschema.Draft4Validator(version["schema"]["openAPIV3Schema"])


def manifests(folder: Path) -> list[tuple[str, dict[str, Any]]]:
    result = []
    for path in sorted(folder.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc and doc.get("apiVersion") == "lorafleet.io/v1alpha1":
                result.append((f"{path.name}:{doc['metadata']['name']}", doc))
    return result


VALID = manifests(ROOT / "examples")
INVALID = manifests(ROOT / "examples/invalid")


def test_there_are_examples_of_both_kinds() -> None:
    kinds = {doc["kind"] for _, doc in VALID}
    assert kinds == {"TrainerPool", "LoraAdapter"}
    assert len(INVALID) >= 5


@pytest.mark.parametrize(("where", "doc"), VALID, ids=[w for w, _ in VALID])
def test_examples_are_valid(where: str, doc: dict[str, Any]) -> None:
    errors = list(validator(doc["kind"]).iter_errors(doc))
    assert errors == [], f"{where}: {[e.message for e in errors]}"


@pytest.mark.parametrize(("where", "doc"), INVALID, ids=[w for w, _ in INVALID])
def test_invalid_manifests_are_rejected(where: str, doc: dict[str, Any]) -> None:
    errors = list(validator(doc["kind"]).iter_errors(doc))
    assert errors, f"{where} was accepted"


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("bad-rank", "rank"),
        ("missing-pool", "pool"),
        ("bad-gpu-residency", "gpuResidency"),
        ("bad-durability", "durability"),
        ("bad-fuse-steps", "fuseSteps"),
        ("pool-without-storage", "storage"),
    ],
)
def test_rejections_name_the_field(name: str, field: str) -> None:
    (doc,) = [doc for _, doc in INVALID if doc["metadata"]["name"] == name]
    errors = list(validator(doc["kind"]).iter_errors(doc))
    assert any(field in ".".join(map(str, e.absolute_path)) + e.message for e in errors), errors


def walk(schema: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    found = [(path, schema)]
    for key, sub in (schema.get("properties") or {}).items():
        found += walk(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        found += walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        found += walk(schema["additionalProperties"], f"{path}{{}}")
    return found


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_every_field_is_described_and_typed(kind: str) -> None:
    (version,) = crd(kind)["spec"]["versions"]
    for path, schema in walk(version["schema"]["openAPIV3Schema"]["properties"]["spec"], "spec"):
        # Named fields and object items are what `kubectl explain` lists; map values and scalar
        # list items are described by their parent.
        named = not path.endswith(("{}", "[]")) or schema.get("type") == "object"
        assert schema.get("description") or not named, f"{kind} {path} has no description (kubectl explain)"
    for path, schema in walk(version["schema"]["openAPIV3Schema"], ""):
        structural = "type" in schema or schema.get("x-kubernetes-int-or-string")
        assert structural, f"{kind} {path or '<root>'} has no type (structural schema)"


@pytest.mark.parametrize(("kind", "short"), [("TrainerPool", "tp"), ("LoraAdapter", "lora")])
def test_names_status_subresource_and_columns(kind: str, short: str) -> None:
    doc = crd(kind)
    assert doc["spec"]["names"]["kind"] == kind
    assert short in doc["spec"]["names"]["shortNames"]
    (version,) = doc["spec"]["versions"]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    if kind == "LoraAdapter":
        assert columns == ["Pool", "Pod", "Phase", "Version", "Cached", "Served", "Age"]


def test_lora_is_immutable_by_cel() -> None:
    (version,) = crd("LoraAdapter")["spec"]["versions"]
    lora = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["lora"]
    rule = {"rule": "self == oldSelf", "message": "spec.lora is immutable"}
    assert rule in lora["x-kubernetes-validations"]


def test_feedback_payloads_are_distill_requests() -> None:
    import json

    payloads = sorted((ROOT / "examples/feedback").glob("*.json"))
    assert payloads
    for path in payloads:
        body = json.loads(path.read_text(encoding="utf-8"))
        for sample in body["samples"]:
            assert len(sample["response_logprobs"]) == len(sample["response_token_ids"]), path.name
            assert {"prompt", "response", "feedback", "prompt_token_ids"} <= sample.keys()


def test_a_pool_says_where_adapters_live_durable_or_explicitly_ephemeral() -> None:
    (version,) = crd("TrainerPool")["spec"]["versions"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert "storage" in spec["required"]
    assert [r["rule"] for r in spec["x-kubernetes-validations"]] == ["has(self.storage)"]
    storage = spec["properties"]["storage"]
    (exclusive,) = storage["x-kubernetes-validations"]
    assert "persistentVolumeClaim" in exclusive["rule"] and "ephemeral" in exclusive["rule"]
    assert storage["properties"]["ephemeral"]["type"] == "boolean"
    pools = {
        doc["metadata"]["name"]: doc["spec"]["storage"] for _, doc in VALID if doc["kind"] == "TrainerPool"
    }
    # The pools a user meets first keep adapters on a claim; the ephemeral one says so.
    assert pools["demo"] == {"persistentVolumeClaim": {"claimName": "demo-adapters"}}
    assert pools["scratch"] == {"ephemeral": True}
