"""Hostile manifests: path traversal in every name field, oversized and deeply nested objects,
NaN/Inf and wrong types, applied with `kubectl` to a real API server that serves LoraFleet's CRDs.

Each must be refused before it exists (by the API server, the CRD schema or kubectl itself, with
a message naming the offending field where the server gives one), and none may disturb the
running release: the operator keeps running and a good adapter applied afterwards becomes Ready.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from tests.reliability.fleetstate import POOL, Faulty, adapter_manifest

from lorafleet_local.kube import CommandError

pytestmark = pytest.mark.e2e

API_VERSION = "lorafleet.io/v1alpha1"
TRAVERSALS = ("../../etc/passwd", "..", "a/../../b", "/abs/path", "x\\..\\y", "%2e%2e%2f", "name\x00")


def _adapter(name: str = "hostile", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"pool": POOL, "lora": {"rank": 4, "targetModules": ["q_proj"]}}
    body.update(spec)
    return {"apiVersion": API_VERSION, "kind": "LoraAdapter", "metadata": {"name": name}, "spec": body}


def _pool(**spec: Any) -> dict[str, Any]:
    # Valid but for the field under test (a pool must say where adapters live).
    body: dict[str, Any] = {"baseModel": "builtin:tiny", "replicas": 1, "storage": {"ephemeral": True}}
    body.update(spec)
    return {"apiVersion": API_VERSION, "kind": "TrainerPool", "metadata": {"name": "hostile"}, "spec": body}


def _annotated(value: str) -> dict[str, Any]:
    body = _adapter()
    body["metadata"]["annotations"] = {"x": value}
    return body


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth):
        value = {"a": value}
    return value


MODULE_0, MODULE_1 = (rf"spec\.lora\.targetModules\[{i}\]" for i in range(2))
NAME_REFUSED = r"metadata\.name|invalid resource name"
# (id, manifest, pattern the refusal must match: the field, or why kubectl would not send it)
CASES: list[tuple[str, dict[str, Any] | str, str]] = [
    # A name with '/', '%' or '..' cannot even form the request path: refused before it is sent.
    *[(f"name-{i}", _adapter(name=t), NAME_REFUSED) for i, t in enumerate(TRAVERSALS)],
    *[(f"pool-{i}", _adapter(pool=t), "spec.pool") for i, t in enumerate(TRAVERSALS)],
    *[
        (f"target-module-{i}", _adapter(lora={"targetModules": ["q_proj", t]}), MODULE_1)
        for i, t in enumerate(TRAVERSALS)
    ],
    *[
        (f"claim-{i}", _pool(storage={"persistentVolumeClaim": {"claimName": t}}), "claimName")
        for i, t in enumerate(TRAVERSALS)
    ],
    ("name-too-long", _adapter(name="a" * 300), "metadata.name"),
    ("too-many-target-modules", _adapter(lora={"targetModules": ["q_proj"] * 65}), "spec.lora.targetModules"),
    ("module-name-too-long", _adapter(lora={"targetModules": ["q" * 129]}), MODULE_0),
    ("base-model-too-long", _pool(baseModel="builtin:" + "x" * 600), "spec.baseModel"),
    ("rank-a-string", _adapter(lora={"rank": "eight"}), "spec.lora.rank"),
    ("rank-a-list", _adapter(lora={"rank": [8]}), "spec.lora.rank"),
    ("rank-huge", _adapter(lora={"rank": 2**62}), "spec.lora.rank"),
    ("rank-a-float", _adapter(lora={"rank": 4.5}), "spec.lora.rank"),
    ("learning-rate-huge", _adapter(training={"learningRate": 1e308}), "spec.training.learningRate"),
    ("learning-rate-negative", _adapter(training={"learningRate": -1}), "spec.training.learningRate"),
    ("replicas-a-string", _pool(replicas="two"), "spec.replicas"),
    ("cache-capacity-garbage", _pool(cache={"capacity": "1e999Ei; rm -rf /"}), "spec.cache.capacity"),
    ("unknown-deep-field", _adapter(training=_nested(200)), "unknown field"),
    ("spec-not-an-object", {**_adapter(), "spec": "pool: demo"}, "spec"),
    ("huge-annotation", _annotated("y" * 300_000), "metadata.annotations"),
    # YAML's .nan and .inf have no JSON form: kubectl refuses to send them.
    ("learning-rate-nan", "training:\n    learningRate: .nan", r"NaN"),
    ("learning-rate-inf", "training:\n    learningRate: .inf", r"Inf"),
    # 1e400 is no float64: YAML keeps it a string, which the schema refuses.
    ("learning-rate-1e400", "training:\n    learningRate: 1e400", "spec.training.learningRate"),
]


@pytest.fixture(scope="module")
def restarts_before(faulty: Faulty) -> int:
    return faulty.operator_restarts()


def _text(manifest: dict[str, Any] | str) -> str:
    if isinstance(manifest, dict):
        return json.dumps(manifest)  # JSON keeps "\x00" and other characters YAML would mangle
    return adapter_manifest(["hostile"]).replace("  lora:", f"  {manifest}\n  lora:")


@pytest.mark.parametrize(("manifest", "names"), [(m, n) for _, m, n in CASES], ids=[c[0] for c in CASES])
def test_hostile_manifest_is_refused_and_nothing_is_created(
    faulty: Faulty, restarts_before: int, manifest: dict[str, Any] | str, names: str
) -> None:
    kube = faulty.fleet.kube
    with pytest.raises(CommandError) as refused:
        kube.kubectl("apply", "-n", faulty.ns, "-f", "-", input=_text(manifest))
    message = refused.value.stderr
    assert re.search(names, message), message[-2000:]
    assert "panic" not in message.lower() and "internal error" not in message.lower(), message[-2000:]
    listing = kube.get("loraadapters,trainerpools", "-n", faulty.ns)["items"]
    assert "hostile" not in {i["metadata"]["name"] for i in listing}


def test_the_release_is_undisturbed_by_hostile_manifests(faulty: Faulty, restarts_before: int) -> None:
    faulty.apply(["after-hostile"])
    seen = faulty.wait_ready(["after-hostile"], timeout=120)
    faulty.assert_placed_once(seen, {"after-hostile": 1})
    assert faulty.operator_restarts() == restarts_before, "the operator restarted during the battery"
