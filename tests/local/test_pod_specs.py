"""Unit tests of the pod runner's pure part: a Pod dict in, a local process plan out."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from lorafleet_local import pod_specs

VENV = Path("/venv/bin")
SECRETS = {
    ("Secret", "team-a", "auth"): {"token": "s3cret"},
    ("ConfigMap", "team-a", "cfg"): {"level": "debug"},
}


def lookup(kind: str, namespace: str, name: str) -> Mapping[str, str]:
    return SECRETS[(kind, namespace, name)]


def trainer_pod(**container: Any) -> dict[str, Any]:
    base = {
        "name": "trainer",
        "image": "lorafleet-trainer:cpu",
        "args": ["serve", "--host", "0.0.0.0", "--port", "8080", "--storage", "/data/adapters"],
        "env": [
            {"name": "LORAFLEET_TRAINER_AUTH_TOKEN_FILE", "value": "/var/run/lorafleet/auth/token"},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {
                "name": "POOL",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['lorafleet.io/pool']"}},
            },
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "auth", "key": "token"}}},
        ],
        "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
        "volumeMounts": [
            {"name": "store", "mountPath": "/data"},
            {"name": "auth", "mountPath": "/var/run/lorafleet/auth", "readOnly": True},
        ],
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}},
    }
    base.update(container)
    return {
        "metadata": {
            "name": "pool-a-0",
            "namespace": "team-a",
            "uid": "u-1",
            "labels": {"lorafleet.io/pool": "pool-a"},
        },
        "spec": {
            "containers": [base],
            "volumes": [
                {"name": "store", "persistentVolumeClaim": {"claimName": "adapters"}},
                {"name": "auth", "secret": {"secretName": "auth"}},
            ],
        },
    }


def make_plan(pod: dict[str, Any], tmp_path: Path) -> pod_specs.LocalPlan:
    return pod_specs.plan(
        pod, "127.9.0.2", VENV, tmp_path / "pod", tmp_path / "claims", lookup, {"PATH": "/usr/bin"}
    )


def test_trainer_pod_runs_the_venv_script_on_its_own_address_with_mapped_paths(tmp_path: Path) -> None:
    plan = make_plan(trainer_pod(), tmp_path)
    assert plan.program == pod_specs.TRAINER
    assert plan.argv == [
        str(VENV / "lorafleet-trainer"),
        "serve",
        "--host",
        "127.9.0.2",
        "--port",
        "8080",
        "--storage",
        str(tmp_path / "claims" / "adapters" / "adapters"),
    ]
    assert plan.env["LORAFLEET_TRAINER_AUTH_TOKEN_FILE"] == str(
        tmp_path / "pod" / "volumes" / "auth" / "token"
    )
    assert plan.env["POD_NAME"] == "pool-a-0"
    assert plan.env["POD_IP"] == "127.9.0.2"
    assert plan.env["POOL"] == "pool-a"
    assert plan.env["TOKEN"] == "s3cret"
    assert plan.env["CFG_level"] == "debug"
    assert plan.env["PATH"].startswith(str(VENV))
    assert plan.readiness == ("/readyz", 8080)


def test_a_trainer_without_host_flag_gets_one_and_a_command_naming_the_program_is_replaced(
    tmp_path: Path,
) -> None:
    pod = trainer_pod(command=["/usr/local/bin/lorafleet-trainer"], args=["serve", "--port=8080"])
    plan = make_plan(pod, tmp_path)
    assert plan.argv == [str(VENV / "lorafleet-trainer"), "serve", "--port=8080", "--host", "127.9.0.2"]


def test_flag_equals_forms_are_localized(tmp_path: Path) -> None:
    plan = make_plan(trainer_pod(args=["serve", "--host=0.0.0.0", "--storage=/data/x"]), tmp_path)
    assert plan.argv[1:] == [
        "serve",
        "--host=127.9.0.2",
        f"--storage={tmp_path / 'claims' / 'adapters' / 'x'}",
    ]


def test_the_operator_is_recognised_by_its_command_and_other_pods_are_left_alone() -> None:
    operator = {
        "metadata": {"name": "op"},
        "spec": {"containers": [{"name": "op", "command": ["lorafleet-operator"]}]},
    }
    other = {"metadata": {"name": "curl"}, "spec": {"containers": [{"name": "c", "command": ["curl", "x"]}]}}
    assert pod_specs.program_of(operator) == pod_specs.OPERATOR
    assert pod_specs.program_of(other) is None


def test_a_missing_secret_key_and_an_unknown_volume_are_named(tmp_path: Path) -> None:
    missing_key = trainer_pod(
        env=[{"name": "X", "valueFrom": {"secretKeyRef": {"name": "auth", "key": "nope"}}}]
    )
    with pytest.raises(pod_specs.PodSpecError, match="env X: Secret auth has no key 'nope'"):
        make_plan(missing_key, tmp_path)
    unknown_volume = trainer_pod(volumeMounts=[{"name": "ghost", "mountPath": "/g"}])
    with pytest.raises(pod_specs.PodSpecError, match=r"volumeMounts\[ghost\]"):
        make_plan(unknown_volume, tmp_path)
    bad_probe = trainer_pod(readinessProbe={"httpGet": {"path": "/readyz", "port": "metrics"}})
    with pytest.raises(pod_specs.PodSpecError, match=r"readinessProbe\.httpGet\.port 'metrics'"):
        make_plan(bad_probe, tmp_path)


def test_longest_mount_wins() -> None:
    volumes = [
        pod_specs.Volume("/data/cache", Path("/local/cache"), "emptyDir"),
        pod_specs.Volume("/data", Path("/local/data"), "emptyDir"),
    ]
    assert pod_specs.map_path("/data/cache/a", volumes) == "/local/cache/a"
    assert pod_specs.map_path("/data/b", volumes) == "/local/data/b"
    assert pod_specs.map_path("/database", volumes) == "/database"


def test_resource_field_refs_resolve_as_the_kubelet_does() -> None:
    container = {"resources": {"requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"cpu": "500m"}}}

    def ref(resource: str, divisor: str = "1") -> str:
        return pod_specs._resource_field_ref(container, {"resource": resource, "divisor": divisor})

    assert ref("requests.cpu", "1m") == "2000"
    assert ref("limits.cpu", "1m") == "500"
    assert ref("limits.cpu") == "1"  # rounded up, as the kubelet does
    assert ref("requests.memory") == str(2**30)
    # Unset: the node's capacity (here, this machine's) stands in.
    assert int(pod_specs._resource_field_ref({}, {"resource": "requests.cpu", "divisor": "1m"})) >= 1000


def test_an_optional_secret_volume_is_marked_so(tmp_path: Path) -> None:
    pod = trainer_pod(
        volumeMounts=[
            {"name": "store", "mountPath": "/data"},
            {"name": "key", "mountPath": "/etc/key", "readOnly": True},
        ]
    )
    pod["spec"]["volumes"].append(
        {
            "name": "key",
            "secret": {"secretName": "servers", "items": [{"key": "k", "path": "api-key"}], "optional": True},
        }
    )
    volumes = {v.mount_path: v for v in make_plan(pod, tmp_path).volumes}
    # The runner mounts an optional Secret that is missing (or lacks the key) as an empty volume.
    assert volumes["/etc/key"].optional and volumes["/etc/key"].source_name == "servers"
    assert not volumes["/data"].optional
