"""Security of what LoraFleet deploys and persists.

Rendered pods (every chart template with every CI values file, the chart's helm test pod, and the
operator's trainer pods for each pool variant) meet the "restricted" Pod Security Standard; the
chart's NetworkPolicy lets only the operator, the helm test, labelled client namespaces and the
Prometheus namespace reach trainer pods; no code loads persisted data with pickle, and a storage
directory after real steps holds only JSON and safetensors.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.chart import charting
from tests.reliability import pss, stored
from tests.trainer.engine_helpers import samples

from lorafleet_api import pools
from lorafleet_operator import building
from lorafleet_operator.settings import OperatorSettings
from lorafleet_trainer.engine.engine import EngineConfig, TrainerEngine
from lorafleet_trainer.ids import AdapterId
from lorafleet_trainer.learning.configs import LoraSpec

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = OperatorSettings(trainer_image="example/trainer:1", trainer_port=8080)


def _pool(**spec: Any) -> pools.Pool:
    body = {"baseModel": "builtin:tiny", "replicas": 2, **spec}
    return pools.parse({"metadata": {"namespace": "team-a", "name": "qwen", "uid": "u1"}, "spec": body})


POOL_VARIANTS = {
    "plain": {},
    "auth": {"authSecretRef": {"name": "trainer-auth"}},
    "pvc": {"storage": {"persistentVolumeClaim": {"claimName": "adapters"}}},
    "cpu": {"gpu": False},
}


@pytest.mark.parametrize("variant", sorted(POOL_VARIANTS))
def test_operator_trainer_pods_are_restricted(variant: str) -> None:
    pod = building.build_pod(_pool(**POOL_VARIANTS[variant]), 0, SETTINGS)
    assert pss.violations(pod["spec"], pod["metadata"].get("annotations")) == []


@pytest.mark.parametrize(
    "values", [None, *charting.ci_value_files()], ids=lambda p: p.name if p else "defaults"
)
def test_chart_pods_are_restricted(values: Path | None) -> None:
    docs = charting.render([values] if values else [])
    found = pss.pod_specs(docs)
    assert any(name.startswith("Deployment/") for name, _, _ in found), "the operator Deployment is missing"
    for name, spec, notes in found:
        assert pss.violations(spec, notes) == [], name


def test_helm_test_pod_is_restricted() -> None:
    done = charting.helm(*charting.template_args(), "--show-only", "templates/tests/test-connection.yaml")
    assert done.returncode == 0, done.stderr
    (pod,) = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert pss.violations(pod["spec"]) == []


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.update(hostNetwork=True),
        lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        lambda s: s["volumes"].append({"name": "n", "nfs": {"server": "x", "path": "/"}}),
        lambda s: s["containers"][0]["securityContext"].update(privileged=True),
        lambda s: s["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
        lambda s: s["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
        lambda s: s["containers"][0]["securityContext"].update(capabilities={"drop": ["NET_RAW"]}),
        lambda s: s["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
        lambda s: s["containers"][0]["securityContext"].update(runAsNonRoot=False),
        lambda s: s["securityContext"].update(runAsUser=0),
        lambda s: s["containers"][0]["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        lambda s: (
            s["securityContext"].pop("seccompProfile"),
            s["containers"][0]["securityContext"].pop("seccompProfile"),
        ),
        lambda s: (
            s["securityContext"].pop("runAsNonRoot"),
            s["containers"][0]["securityContext"].pop("runAsNonRoot"),
        ),
        lambda s: s["containers"][0]["ports"][0].update(hostPort=8080),
        lambda s: s["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]),
    ],
)
def test_checker_catches_each_violation(mutate: Any) -> None:
    # The checker itself must fail on a broken pod, or the tests above prove nothing.
    spec = copy.deepcopy(building.build_pod(_pool(), 0, SETTINGS)["spec"])
    mutate(spec)
    assert pss.violations(spec) != []


def _policies(sets: list[str]) -> list[dict[str, Any]]:
    return charting.kinds(charting.render(sets=sets), "NetworkPolicy")


def test_network_policy_admits_only_operator_and_labelled_namespaces() -> None:
    (policy,) = _policies([])
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    # It selects the operator's trainer pods.
    pod_labels = building.labels(_pool(), 0)
    for expr in spec["podSelector"]["matchExpressions"]:
        assert expr["operator"] == "Exists" and expr["key"] in pod_labels
    (rule,) = spec["ingress"]
    assert [p["port"] for p in rule["ports"]] == [8080]
    peers = rule["from"]
    for peer in peers:
        assert "ipBlock" not in peer, peer
        ns = peer["namespaceSelector"]
        assert ns.get("matchLabels"), f"a peer admits every namespace: {peer}"
    release_ns = {"kubernetes.io/metadata.name": "lorafleet"}
    components = sorted(
        p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in peers if "podSelector" in p
    )
    assert components == ["gateway", "helm-test", "operator"]
    assert all(p["namespaceSelector"]["matchLabels"] == release_ns for p in peers if "podSelector" in p)
    namespace_only = [p["namespaceSelector"]["matchLabels"] for p in peers if "podSelector" not in p]
    client = {"lorafleet.io/client": "true"}  # the chart's default clientNamespaceLabels
    expected = [client, {"kubernetes.io/metadata.name": "monitoring"}]
    assert sorted(namespace_only, key=str) == sorted(expected, key=str)


def test_network_policy_without_client_labels_admits_no_client_namespace() -> None:
    (policy,) = _policies(
        ["networkPolicy.clientNamespaceLabels=null", "networkPolicy.prometheusNamespaceLabels=null"]
    )
    peers = policy["spec"]["ingress"][0]["from"]
    assert all("podSelector" in p for p in peers), peers


# ---- nothing persisted is a pickle ---------------------------------------------------------------

UNSAFE_LOAD = re.compile(
    r"\b(pickle\.loads?|torch\.load|cPickle|dill\.loads?|joblib\.load|numpy\.load|np\.load)\s*\("
)


def test_no_code_loads_with_pickle() -> None:
    found = []
    for package in ("trainer/src", "operator/src"):
        for path in (ROOT / package).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                m = UNSAFE_LOAD.search(line)
                if m and not (m.group(1) == "torch.load" and "weights_only=True" in line):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert found == []


def test_storage_holds_only_json_and_safetensors(tmp_path: Path, model_cache: Path) -> None:
    root = tmp_path / "store"
    engine = TrainerEngine(
        EngineConfig(
            storage_root=root, cache_capacity_bytes=1 << 26, device="cpu", model_cache_dir=model_cache
        )
    )
    engine.load()
    adapter = AdapterId("sec", "pickles")
    engine.init_adapter(adapter, LoraSpec(rank=4, alpha=8, target_modules=("q_proj",)), epoch=1)
    for seed in range(2):
        engine.distill(adapter, samples(seed))
    engine.init_adapter(adapter, LoraSpec(rank=4, alpha=8, target_modules=("q_proj",)), epoch=2)
    assert any(root.rglob("*.safetensors"))
    assert stored.unsafe_files(root) == []
    (root / "sec" / "planted.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle of 1
    assert stored.unsafe_files(root) == [root / "sec" / "planted.bin"]
