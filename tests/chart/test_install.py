"""The chart on a real Kubernetes API server (the local control plane): install, upgrade, reinstall.

What only a live API server shows: `lookup` keeps the trainers' token across upgrades and a
reinstall; the RBAC objects are accepted and, evaluated by the API server's own authorizer, let
the operator's ServiceAccount do what the operator does and nothing else; the TrainerPool from
values passes the CRD's schema; and no monitoring.coreos.com objects are sent to a cluster
without that API. No kubelet runs here, so the operator pod stays Pending (tests/e2e runs it).
"""

from __future__ import annotations

import base64
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from tests.chart import charting

from lorafleet_local import polling
from lorafleet_local.control_plane import ControlPlane

pytestmark = pytest.mark.e2e

RELEASE, NS = "lf", "lorafleet"
SA = f"system:serviceaccount:{NS}:lf-lorafleet"
SECRET = "lf-lorafleet-trainer-auth"
MODES = ("enforce", "warn", "audit")


class Cluster:
    def __init__(self, plane: ControlPlane, workdir: Path) -> None:
        self.env = {
            **os.environ,
            "KUBECONFIG": str(plane.kubeconfig),
            "HELM_CACHE_HOME": str(workdir / "helm-cache"),
            "HELM_CONFIG_HOME": str(workdir / "helm-config"),
            "HELM_DATA_HOME": str(workdir / "helm-data"),
        }

    def run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        binary = charting.tool(tool, "run `make kube-clients`")
        done = subprocess.run(
            [binary, *args], capture_output=True, text=True, env=self.env, timeout=300, check=False
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} failed:\n{done.stderr}")
        return done

    def helm_install(self, *sets: str) -> None:
        args = ["upgrade", "--install", RELEASE, str(charting.CHART), "-n", NS]
        for item in sets:
            args += ["--set", item]
        done = self.run("helm", *args)
        # The API server warns through helm when a pod template would break the namespace's policy.
        assert "PodSecurity" not in done.stderr, done.stderr

    def token(self) -> str:
        out = self.run("kubectl", "get", "secret", SECRET, "-n", NS, "-o", "jsonpath={.data.token}").stdout
        return base64.b64decode(out).decode()

    def can(self, verb: str, resource: str, namespace: str | None = NS) -> bool:
        where = ["-n", namespace] if namespace else []
        done = self.run("kubectl", "auth", "can-i", verb, resource, *where, "--as", SA, check=False)
        return done.stdout.strip() == "yes"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("chart-install")
    plane = ControlPlane(workdir / "plane").start()
    try:
        handle = Cluster(plane, workdir)
        handle.run("kubectl", "create", "namespace", "team-a")
        # The release namespace enforces the restricted Pod Security Standard, as a careful cluster would.
        handle.run("kubectl", "create", "namespace", NS)
        handle.run(
            "kubectl",
            "label",
            "namespace",
            NS,
            *(f"pod-security.kubernetes.io/{m}=restricted" for m in MODES),
        )
        handle.helm_install("trainerPool.enabled=true", "trainerPool.gpu=false", "rbac.namespaces={team-a}")
        yield handle
    finally:
        plane.stop()


def test_token_survives_upgrade_and_reinstall(cluster: Cluster) -> None:
    first = cluster.token()
    assert len(first) == 48
    cluster.helm_install(
        "trainerPool.enabled=true", "trainerPool.gpu=false", "rbac.namespaces={team-a}", "operator.replicas=2"
    )
    assert cluster.token() == first, "an upgrade must not rotate the token running trainers hold"
    cluster.run("helm", "uninstall", RELEASE, "-n", NS)
    # helm.sh/resource-policy: keep leaves the Secret behind, and the reinstall adopts it.
    assert cluster.token() == first
    cluster.helm_install("trainerPool.enabled=true", "trainerPool.gpu=false", "rbac.namespaces={team-a}")
    assert cluster.token() == first


def test_pool_from_values_passes_the_crd_and_gets_its_defaults(cluster: Cluster) -> None:
    out = cluster.run("kubectl", "get", "trainerpools", "-n", NS, "-o", "yaml").stdout
    (pool,) = yaml.safe_load(out)["items"]
    assert pool["metadata"]["name"] == "lf-lorafleet-trainers"
    assert pool["spec"]["authSecretRef"] == {"name": SECRET, "key": "token"}
    assert pool["spec"]["gpu"] is False
    claim = "lf-lorafleet-trainers-adapters"
    assert pool["spec"]["storage"] == {"persistentVolumeClaim": {"claimName": claim}}
    cluster.run("kubectl", "get", "pvc", claim, "-n", NS)


def test_no_monitoring_objects_without_the_prometheus_operator_api(cluster: Cluster) -> None:
    manifest = cluster.run("helm", "get", "manifest", RELEASE, "-n", NS).stdout
    kinds = {doc["kind"] for doc in yaml.safe_load_all(manifest) if doc}
    assert not kinds & {"PodMonitor", "ServiceMonitor", "PrometheusRule"}
    assert {"Deployment", "Role", "ClusterRole", "NetworkPolicy", "ConfigMap", "Secret"} <= kinds


ALLOWED = [
    ("watch", "trainerpools.lorafleet.io", NS),
    ("patch", "loraadapters.lorafleet.io", "team-a"),
    ("patch", "loraadapters.lorafleet.io/status", NS),
    ("create", "pods", "team-a"),
    ("delete", "pods", NS),
    ("create", "services", NS),
    ("create", "events", NS),
    ("create", "events.events.k8s.io", "team-a"),
    ("update", "leases.coordination.k8s.io", NS),
    ("list", "customresourcedefinitions.apiextensions.k8s.io", None),
    ("watch", "namespaces", None),
]
DENIED = [
    ("create", "pods", "default"),  # not a watched namespace
    ("list", "loraadapters.lorafleet.io", "kube-system"),
    ("get", "secrets", NS),  # the token comes from a mounted file, never the API
    ("delete", "services", NS),
    ("delete", "trainerpools.lorafleet.io", NS),
    ("update", "leases.coordination.k8s.io", "team-a"),
    ("create", "customresourcedefinitions.apiextensions.k8s.io", None),
    ("create", "clusterroles.rbac.authorization.k8s.io", None),
]


@pytest.mark.parametrize(("verb", "resource", "namespace"), ALLOWED, ids=lambda x: str(x))
def test_service_account_may_do_what_the_operator_does(
    cluster: Cluster, verb: str, resource: str, namespace: str | None
) -> None:
    assert cluster.can(verb, resource, namespace)


@pytest.mark.parametrize(("verb", "resource", "namespace"), DENIED, ids=lambda x: str(x))
def test_service_account_may_do_nothing_else(
    cluster: Cluster, verb: str, resource: str, namespace: str | None
) -> None:
    assert not cluster.can(verb, resource, namespace)


def test_operator_pod_is_admitted_under_the_restricted_pod_security_standard(cluster: Cluster) -> None:
    # The ReplicaSet controller could only create the pod if PodSecurity admission let it in.
    def operator_pods() -> list[str]:
        out = cluster.run(
            "kubectl", "get", "pods", "-n", NS, "-l", "app.kubernetes.io/component=operator", "-o", "name"
        )
        return out.stdout.split()

    try:
        polling.eventually("an operator pod", operator_pods, timeout=60, interval=1.0)
    except TimeoutError as exc:
        raise AssertionError(cluster.run("kubectl", "get", "events", "-n", NS).stdout) from exc


def test_helm_test_pod_is_admitted_under_the_restricted_pod_security_standard(
    cluster: Cluster, tmp_path: Path
) -> None:
    manifest = cluster.run("helm", "get", "hooks", RELEASE, "-n", NS).stdout
    path = tmp_path / "hooks.yaml"
    path.write_text(manifest, encoding="utf-8")
    done = cluster.run("kubectl", "create", "--dry-run=server", "-n", NS, "-f", str(path), check=False)
    assert done.returncode == 0, done.stderr
    assert "lf-lorafleet-test created (server dry run)" in done.stdout
    assert "PodSecurity" not in done.stderr


def test_an_unrestricted_pod_would_have_been_refused(cluster: Cluster, tmp_path: Path) -> None:
    # The two tests above mean something only if the namespace really enforces the standard.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "unrestricted", "namespace": NS},
        # Nothing privileged, just none of the restricted profile's settings (non-root, seccomp, drop ALL).
        "spec": {"containers": [{"name": "c", "image": "x"}]},
    }
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump(pod), encoding="utf-8")
    done = cluster.run("kubectl", "create", "--dry-run=server", "-f", str(path), check=False)
    assert done.returncode != 0
    assert "violates PodSecurity" in done.stderr
