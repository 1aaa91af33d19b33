"""`helm template` output checked against Kubernetes' own schemas and the project's CRDs.

Built-in kinds are validated strictly (unknown fields fail) against the pinned Kubernetes version's
OpenAPI schemas from kubernetes-validate; the TrainerPool against the structural schema of
crds/lorafleet.io_trainerpools.yaml, with unknown fields refused as the API server would prune them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from tests.chart import charting

from lorafleet_gateway.settings import ENV_PREFIX as GATEWAY_ENV
from lorafleet_gateway.settings import GatewaySettings

VALUE_SETS: dict[str, tuple[list[Path], list[str]]] = {
    "defaults": ([], []),
    "defaults-with-pool-and-monitoring": ([], ["trainerPool.enabled=true", "prometheus.force=true"]),
    **{path.name: ([path], []) for path in charting.ci_value_files()},
}


def crd_schema(plural: str) -> dict[str, Any]:
    crd = yaml.safe_load((charting.ROOT / "crds" / f"lorafleet.io_{plural}.yaml").read_text(encoding="utf-8"))
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    return closed(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


def closed(schema: dict[str, Any]) -> dict[str, Any]:
    """Refuses fields the structural schema does not declare (the API server would drop them)."""
    open_ended = "additionalProperties" in schema or schema.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in schema and not open_ended:
        schema["additionalProperties"] = False
    for child in schema.get("properties", {}).values():
        closed(child)
    if isinstance(schema.get("items"), dict):
        closed(schema["items"])
    return schema


@pytest.mark.parametrize("name", VALUE_SETS)
def test_rendered_objects_validate(name: str) -> None:
    files, sets = VALUE_SETS[name]
    docs = charting.render(files, sets, api_versions=[charting.MONITORING_API])
    assert docs, "the chart rendered nothing"
    pool_schema = crd_schema("trainerpools")
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"].startswith("lorafleet.io/"):
            assert doc["kind"] == "TrainerPool", where
            jsonschema.validate(doc, pool_schema)
        elif doc["apiVersion"] == charting.MONITORING_API:
            assert doc["kind"] in {"PodMonitor", "ServiceMonitor", "PrometheusRule"}, where
        else:
            try:
                kubernetes_validate.validate(doc, charting.KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as error:
                raise AssertionError(f"{where}: {error.message} at {list(error.path)}") from error


@pytest.mark.parametrize("kube_version", ["1.29.0", "1.37.0"])
def test_objects_also_validate_on_the_oldest_and_newest_supported_kubernetes(kube_version: str) -> None:
    # Chart.yaml promises >=1.29 (CRD validation rules went GA there).
    docs = charting.render(sets=["trainerPool.enabled=true", "rbac.scope=cluster"], kube_version=kube_version)
    for doc in docs:
        if doc["apiVersion"].startswith("lorafleet.io/"):
            continue
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            raise AssertionError(f"{doc['kind']}: {error.message} at {list(error.path)}") from error


def test_kube_versions_below_the_floor_are_refused() -> None:
    done = charting.helm(*charting.template_args(kube_version="1.28.0"))
    assert done.returncode != 0
    assert "kubeVersion" in done.stderr or "incompatible" in done.stderr, done.stderr


def test_every_object_is_labelled_and_namespaced_by_the_release() -> None:
    docs = charting.render([], ["trainerPool.enabled=true", "prometheus.force=true"])
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding"}
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "lf", doc["metadata"]["name"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        if doc["kind"] not in cluster_scoped:
            assert doc["metadata"]["namespace"] == "lorafleet", doc["metadata"]["name"]


def test_operator_pod_is_restricted_and_probed() -> None:
    (deployment,) = charting.component(charting.render(), "Deployment", "operator")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert pod["serviceAccountName"] == "lf-lorafleet"


def test_monitoring_objects_follow_the_api_or_the_force_value() -> None:
    wanted = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}
    absent = {doc["kind"] for doc in charting.render()}
    detected = {doc["kind"] for doc in charting.render(api_versions=[charting.MONITORING_API])}
    forced = {doc["kind"] for doc in charting.render(sets=["prometheus.force=true"])}
    assert not wanted & absent
    assert wanted <= detected
    assert wanted <= forced


def test_each_service_monitor_scrapes_its_own_service_as_its_job() -> None:
    docs = charting.render(sets=["prometheus.force=true"])
    assert len(charting.kinds(docs, "ServiceMonitor")) == 2
    for name, job in (("operator", "lorafleet-operator"), ("gateway", "lorafleet-gateway")):
        (monitor,) = charting.component(docs, "ServiceMonitor", name)
        (service,) = charting.component(docs, "Service", name)
        wanted = monitor["spec"]["selector"]["matchLabels"]
        assert wanted.items() <= service["metadata"]["labels"].items(), name
        # No other Service of the release matches: only this component's pods are scraped as its job.
        assert [
            s for s in charting.kinds(docs, "Service") if wanted.items() <= s["metadata"]["labels"].items()
        ] == [service]
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [service["metadata"]["namespace"]]}
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
        assert endpoint["path"] == "/metrics"
        assert endpoint["relabelings"] == [{"targetLabel": "job", "replacement": job}]


@pytest.mark.parametrize("off", ["gateway.enabled=false", "prometheus.serviceMonitor.enabled=false"])
def test_the_gateway_service_monitor_needs_the_gateway_and_service_monitors(off: str) -> None:
    docs = charting.render(sets=["prometheus.force=true", off])
    assert not charting.component(docs, "ServiceMonitor", "gateway")


def test_prometheus_rule_carries_the_plain_rules_file() -> None:
    (rule,) = charting.kinds(charting.render(sets=["prometheus.force=true"]), "PrometheusRule")
    plain = yaml.safe_load((charting.CHART / "alerts" / "lorafleet.rules.yaml").read_text(encoding="utf-8"))
    assert rule["spec"] == plain
    assert [group["name"] for group in plain["groups"]] == [
        "lorafleet-trainers",
        "lorafleet-operator",
        "lorafleet-gateway",
    ]


def test_dashboards_ship_as_sidecar_configmaps() -> None:
    configmaps = charting.kinds(charting.render(), "ConfigMap")
    shipped = {}
    for configmap in configmaps:
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((key, text),) = configmap["data"].items()
        shipped[key] = json.loads(text)
    files = {
        f"lorafleet-{path.name}": json.loads(path.read_text(encoding="utf-8"))
        for path in (charting.CHART / "dashboards").glob("*.json")
    }
    assert shipped == files
    assert {d["title"] for d in shipped.values()} == {
        "LoraFleet / Trainers",
        "LoraFleet / Operator",
        "LoraFleet / Gateway",
    }


def test_trainer_pool_from_values_uses_the_generated_token() -> None:
    docs = charting.render(sets=["trainerPool.enabled=true", "trainerPool.gpu=false"])
    (pool,) = charting.kinds(docs, "TrainerPool")
    (secret,) = charting.kinds(docs, "Secret")
    assert pool["spec"]["authSecretRef"] == {"name": secret["metadata"]["name"], "key": "token"}
    assert pool["spec"]["gpu"] is False
    assert pool["spec"]["baseModel"] == "builtin:tiny"
    assert len(secret["data"]["token"]) >= 48
    # Kept on uninstall, so trainers that outlive a release keep their token.
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_the_release_pool_keeps_adapters_on_a_claim_unless_told_ephemeral() -> None:
    docs = charting.render(sets=["trainerPool.enabled=true"])
    (pool,) = charting.kinds(docs, "TrainerPool")
    (claim,) = charting.kinds(docs, "PersistentVolumeClaim")
    assert pool["spec"]["storage"] == {"persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    # Kept on uninstall: it holds every adapter's trained state.
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    existing = charting.render(sets=["trainerPool.enabled=true", "trainerPool.storage.existingClaim=mine"])
    assert not charting.kinds(existing, "PersistentVolumeClaim")
    (pool,) = charting.kinds(existing, "TrainerPool")
    assert pool["spec"]["storage"] == {"persistentVolumeClaim": {"claimName": "mine"}}
    ephemeral = charting.render(sets=["trainerPool.enabled=true", "trainerPool.storage.ephemeral=true"])
    assert not charting.kinds(ephemeral, "PersistentVolumeClaim")
    (pool,) = charting.kinds(ephemeral, "TrainerPool")
    assert pool["spec"]["storage"] == {"ephemeral": True}


def test_existing_secret_replaces_the_generated_one() -> None:
    docs = charting.render(sets=["trainerAuth.existingSecret=mine", "trainerAuth.secretKey=bearer"])
    assert not charting.kinds(docs, "Secret")
    (deployment,) = charting.component(docs, "Deployment", "operator")
    pod = deployment["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == "mine"
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["LORAFLEET_OPERATOR_AUTH_TOKEN_FILE"] == "/var/run/lorafleet/auth/bearer"


def test_network_policy_admits_only_the_operator_clients_and_prometheus() -> None:
    docs = charting.render(sets=["rbac.namespaces={team-a}"])
    policies = charting.kinds(docs, "NetworkPolicy")
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["lorafleet", "team-a"]
    for policy in policies:
        assert policy["spec"]["podSelector"]["matchExpressions"] == [
            {"key": "lorafleet.io/pool", "operator": "Exists"}
        ]
        (rule,) = policy["spec"]["ingress"]
        assert rule["ports"] == [{"port": 8080, "protocol": "TCP"}]
        sources = rule["from"]
        assert sources[0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
        assert sources[0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "lorafleet"}
        assert {"namespaceSelector": {"matchLabels": {"lorafleet.io/client": "true"}}} in sources
        assert sources[1]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
        assert sources[1]["namespaceSelector"] == sources[0]["namespaceSelector"]
        assert len(sources) == 5


@pytest.mark.parametrize("values_file", charting.ci_value_files(), ids=lambda p: p.name)
def test_the_gateways_flags_and_env_are_its_settings(values_file: Path) -> None:
    """What the chart gives the gateway container parses as the gateway's settings (a number Helm
    renders as 6.7e+07 would stop every replica at start)."""
    (deployment,) = charting.component(charting.render([values_file]), "Deployment", "gateway")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {
        e["name"].removeprefix(GATEWAY_ENV).lower(): e["value"]
        for e in container["env"]
        if e["name"].startswith(GATEWAY_ENV)
    }
    args = container["args"]
    flags = {a.removeprefix("--").replace("-", "_"): v for a, v in zip(args[::2], args[1::2], strict=True)}
    settings = GatewaySettings(**{**env, **flags})
    assert settings.port == container["ports"][0]["containerPort"]
    defaults = yaml.safe_load((charting.CHART / "values.yaml").read_text())["gateway"]
    assert settings.record_max_bytes == defaults["recordMaxBytes"]
