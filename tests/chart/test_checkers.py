"""Independent checkers on what LoraFleet puts in a cluster, including what `helm template` never shows.

For every ci/ values file: the rendered chart plus the trainer Pods and Services the operator builds
for the TrainerPools in that render (through its own pure builders), checked by kubeconform against
offline schemas (Kubernetes' from kubernetes-validate, LoraFleet's CRDs and the Prometheus Operator's
converted by crd_schemas.py) and by kube-score with the ignored checks listed below, each with its
reason. Both tools are pinned in tools/checkers/go.mod and built by `make tools`.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from tests.chart import charting
from tests.chart.crd_schemas import write_kubernetes_schemas, write_schemas

from lorafleet_api import pools
from lorafleet_operator import building
from lorafleet_operator.settings import ENV_PREFIX, OperatorSettings

K8S_SCHEMAS = (
    Path(kubernetes_validate.__file__).parent
    / "kubernetes-json-schema"
    / f"v{charting.KUBE_VERSION}-local-strict"
)
NAMESPACE = "lorafleet"
CRD_LOCATION = "{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json"
HINT = "run `make tools` (scripts/build-checkers.sh)"

# kube-score checks that do not apply to LoraFleet, each with its reason. Every other default check
# (resources, ephemeral storage, probes, security context, image tags, labels...) must pass.
IGNORED = {
    # It wants pullPolicy Always. The images are release-tagged and the trainer image holds torch
    # (gigabytes): pulling it on every pod start would slow each re-placement for no gain.
    "container-image-pull-policy": "release tags with IfNotPresent; the trainer image is gigabytes",
    # It wants every pod under a NetworkPolicy for ingress and egress. The chart's policy guards the
    # trainers' ingress; egress is left to the cluster: trainers fetch models from wherever baseModel
    # points and the operator reaches an API server whose address only the cluster knows.
    "pod-networkpolicy": "trainer ingress is guarded; egress targets are site-specific",
    # The chart puts a trainer NetworkPolicy in each watched namespace before users create pools there.
    "networkpolicy-targets-pod": "policies for namespaces whose pools do not exist yet",
    # The operator is leader-elected: one replica acts at a time, a second is an optional standby
    # (operator.replicas), and a PDB or anti-affinity for one replica would only block node drains.
    "deployment-replicas": "leader-elected operator; standbys are optional",
    "deployment-has-poddisruptionbudget": "a PDB on a single leader-elected replica blocks drains",
    "deployment-has-host-podantiaffinity": "one replica acts at a time",
    # The operator's Deployment uses Recreate so two versions never act on the same objects at once.
    "deployment-strategy": "Recreate: two operator versions must not reconcile side by side",
    # The operator serves no traffic: readiness gates nothing but its metrics endpoint, so the one
    # health check it has is right for both probes.
    "pod-probes-identical": "the operator has one health endpoint and serves no traffic",
}


def manifests(values_file: Path) -> list[dict[str, Any]]:
    """The chart's render for one values file, plus the operator's Pods and Services for its pools."""
    docs = charting.render([values_file], api_versions=[charting.MONITORING_API])
    (deployment,) = charting.component(docs, "Deployment", "operator")
    (operator,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {
        e["name"].removeprefix(ENV_PREFIX).lower(): e["value"]
        for e in operator.get("env", [])
        if e["name"].startswith(ENV_PREFIX) and "value" in e
    }
    settings = OperatorSettings(**env)
    built = []
    for doc in charting.kinds(docs, "TrainerPool"):
        doc = {**doc, "metadata": {"namespace": NAMESPACE, "uid": "uid-1", **doc["metadata"]}}
        pool = pools.parse(doc)
        built += [building.build_pod(pool, i, settings) for i in range(max(pool.spec.replicas, 1))]
        built.append(building.build_service(pool, settings))
    return docs + built


CASES = [pytest.param(path, id=path.name) for path in charting.ci_value_files()]


def test_some_ci_values_render_a_pool_whose_pods_are_checked() -> None:
    assert any(charting.kinds(manifests(path), "Pod") for path in charting.ci_value_files())


@pytest.fixture(scope="module")
def crd_schemas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    into = tmp_path_factory.mktemp("crd-schemas")
    monitoring = Path(charting.tool("kubeconform", HINT)).parent / "monitoring-crds"
    monitoring_crds = sorted(monitoring.glob("*.yaml"))
    assert monitoring_crds, f"no Prometheus Operator CRDs in {monitoring}: {HINT}"
    write_schemas([*sorted((charting.ROOT / "crds").glob("*.yaml")), *monitoring_crds], into)
    return into


def write(tmp_path: Path, docs: list[dict[str, Any]]) -> Path:
    path = tmp_path / "manifests.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False), encoding="utf-8")
    return path


def kubeconform(docs: list[dict[str, Any]], crd_schemas: Path, tmp_path: Path) -> dict[str, Any]:
    """kubeconform -strict on ``docs``; its JSON report (``resources`` lists what was not valid)."""
    builtin = tmp_path / "kubernetes"
    builtin.mkdir(exist_ok=True)
    write_kubernetes_schemas(K8S_SCHEMAS, {(d["apiVersion"], d["kind"]) for d in docs}, builtin)
    argv = [
        charting.tool("kubeconform", HINT),
        "-strict",
        "-summary",
        "-output", "json",
        "-kubernetes-version", charting.KUBE_VERSION,
        "-schema-location", f"{builtin}/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json",
        "-schema-location", f"{crd_schemas}/{CRD_LOCATION}",
        str(write(tmp_path, docs)),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    report: dict[str, Any] = json.loads(done.stdout or "{}")
    report["returncode"] = done.returncode
    return report


@pytest.mark.parametrize("values_file", CASES)
def test_kubeconform_strict(values_file: Path, crd_schemas: Path, tmp_path: Path) -> None:
    docs = manifests(values_file)
    if charting.kinds(docs, "TrainerPool"):
        assert {"Pod", "Service"} <= {d["kind"] for d in docs}, "the operator's objects are checked too"
    report = kubeconform(docs, crd_schemas, tmp_path)
    problems = [r for r in report.get("resources", []) if r.get("status") != "statusValid"]
    assert report["returncode"] == 0 and not problems, json.dumps(report, indent=1)
    assert report["summary"]["valid"] == len(docs), report["summary"]


def test_kubeconform_refuses_what_the_api_server_would(crd_schemas: Path, tmp_path: Path) -> None:
    """The converted schemas have teeth: a rank past the CRD's maximum, an unknown pod field."""
    docs = manifests(charting.ci_value_files()[0])
    pod = next(d for d in charting.kinds(docs, "Pod"))
    bad_pod = {**pod, "spec": {**pod["spec"], "gpuCount": 1}}
    adapter = {"apiVersion": "lorafleet.io/v1alpha1", "kind": "LoraAdapter",
               "metadata": {"name": "a", "namespace": NAMESPACE},
               "spec": {"pool": "p", "lora": {"rank": 600}}}  # fmt: skip
    report = kubeconform([bad_pod, adapter], crd_schemas, tmp_path)
    assert report["returncode"] != 0
    assert {r["kind"] for r in report["resources"] if r["status"] == "statusInvalid"} == {
        "Pod",
        "LoraAdapter",
    }


@pytest.mark.parametrize("values_file", CASES)
def test_kube_score(values_file: Path, tmp_path: Path) -> None:
    argv = [
        charting.tool("kube-score", HINT),
        "score",
        "--output-format",
        "ci",
        "--kubernetes-version",
        "v1.35",
    ]
    for check in IGNORED:
        argv += ["--ignore-test", check]
    argv.append(str(write(tmp_path, manifests(values_file))))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    findings = [line for line in done.stdout.splitlines() if line.startswith(("[CRITICAL]", "[WARNING]"))]
    assert not findings, "\n".join(findings)
