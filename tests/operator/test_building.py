"""The pure pod and Service builders: what a trainer pod of a pool must look like."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from lorafleet_api import pools
from lorafleet_operator import building, names
from lorafleet_operator.settings import OperatorSettings


def pool_body(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"baseModel": "builtin:tiny", "replicas": 3}
    base.update(spec)
    return {"metadata": {"namespace": "team-a", "name": "qwen", "uid": "uid-qwen"}, "spec": base}


SETTINGS = OperatorSettings(trainer_image="example/trainer:1", trainer_port=8080)


def container(pod: dict[str, Any]) -> dict[str, Any]:
    (only,) = pod["spec"]["containers"]
    return only


def test_pod_identity_labels_and_owner() -> None:
    pod = building.build_pod(pools.parse(pool_body()), 2, SETTINGS)
    meta = pod["metadata"]
    assert meta["name"] == "qwen-2"
    assert meta["namespace"] == "team-a"
    assert meta["labels"][names.POOL_LABEL] == "qwen"
    assert meta["labels"][names.ORDINAL_LABEL] == "2"
    assert meta["labels"][names.RESIDENCY_LABEL] == "offload"  # the GPU-memory alert selects on it
    (owner,) = meta["ownerReferences"]
    assert owner == {
        "apiVersion": "lorafleet.io/v1alpha1",
        "kind": "TrainerPool",
        "name": "qwen",
        "uid": "uid-qwen",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert pod["spec"]["subdomain"] == "qwen"


def test_gpu_requested_unless_disabled() -> None:
    limited = pools.parse(pool_body(resources={"limits": {"memory": "8Gi"}}))
    gpu = container(building.build_pod(limited, 0, SETTINGS))
    # The pool's memory limit stands (its request follows it); the CPU takes the default.
    scratch = "18816Mi"  # emptyDirs: 2 x 8Gi adapters + 1152Mi model cache + 1Gi tmp, and 256Mi of logs
    assert gpu["resources"]["limits"] == {
        "memory": "8Gi", "cpu": "2", "ephemeral-storage": scratch, "nvidia.com/gpu": 1
    }  # fmt: skip
    assert gpu["resources"]["requests"] == {"cpu": "2", "ephemeral-storage": scratch, "nvidia.com/gpu": 1}
    cpu = container(building.build_pod(pools.parse(pool_body(gpu=False)), 0, SETTINGS))
    assert "nvidia.com/gpu" not in str(cpu["resources"])
    assert {"name": "LORAFLEET_TRAINER_DEVICE", "value": "cpu"} in cpu["env"]


def test_dtype_reaches_the_trainer() -> None:
    bf16 = container(building.build_pod(pools.parse(pool_body(dtype="bfloat16")), 0, SETTINGS))
    assert {"name": "LORAFLEET_TRAINER_DTYPE", "value": "bfloat16"} in bf16["env"]
    unset = container(building.build_pod(pools.parse(pool_body()), 0, SETTINGS))
    assert {"name": "LORAFLEET_TRAINER_DTYPE", "value": "auto"} in unset["env"]  # the trainer decides
    with pytest.raises(ValidationError):
        pools.parse(pool_body(dtype="int8"))


def test_durability_reaches_the_trainer_and_defaults_to_sync() -> None:
    unset = container(building.build_pod(pools.parse(pool_body()), 0, SETTINGS))
    assert {"name": "LORAFLEET_TRAINER_DURABILITY", "value": "sync"} in unset["env"]
    fast = container(building.build_pod(pools.parse(pool_body(durability="async")), 0, SETTINGS))
    assert {"name": "LORAFLEET_TRAINER_DURABILITY", "value": "async"} in fast["env"]
    with pytest.raises(ValidationError, match="durability"):
        pools.parse(pool_body(durability="eventually"))


def test_fuse_steps_reach_the_trainer_and_default_to_8() -> None:
    unset = container(building.build_pod(pools.parse(pool_body()), 0, SETTINGS))
    assert {"name": "LORAFLEET_TRAINER_FUSE_STEPS", "value": "8"} in unset["env"]
    alone = container(building.build_pod(pools.parse(pool_body(fuseSteps=1)), 0, SETTINGS))
    assert {"name": "LORAFLEET_TRAINER_FUSE_STEPS", "value": "1"} in alone["env"]
    for bad in (0, 257):
        with pytest.raises(ValidationError, match="fuseSteps"):
            pools.parse(pool_body(fuseSteps=bad))


def test_args_probes_and_image() -> None:
    pool = pools.parse(pool_body(cache={"capacity": "2Gi"}))
    c = container(building.build_pod(pool, 0, SETTINGS))
    assert c["image"] == "example/trainer:1"
    assert c["args"] == [
        "serve", "--base-model", "builtin:tiny", "--host", "0.0.0.0", "--port", "8080",
        "--storage", "/var/lib/lorafleet/adapters", "--cache-capacity", str(2 * 2**30),
    ]  # fmt: skip
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    own_image = container(building.build_pod(pools.parse(pool_body(image="mine:2")), 0, SETTINGS))
    assert own_image["image"] == "mine:2"


def test_auth_secret_mounted_as_file_and_passed_to_trainer() -> None:
    pool = pools.parse(pool_body(authSecretRef={"name": "trainer-auth"}))
    pod = building.build_pod(pool, 0, SETTINGS)
    c = container(pod)
    assert c["args"][-2:] == ["--auth-token-file", "/etc/lorafleet/auth/token"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["auth"]["secret"]["secretName"] == "trainer-auth"
    assert volumes["auth"]["secret"]["items"] == [{"key": "token", "path": "token"}]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["auth"] == {"name": "auth", "mountPath": "/etc/lorafleet/auth", "readOnly": True}
    no_auth = building.build_pod(pools.parse(pool_body()), 0, SETTINGS)
    assert "--auth-token-file" not in container(no_auth)["args"]
    assert "auth" not in {v["name"] for v in no_auth["spec"]["volumes"]}


def test_servers_api_key_mounted_from_an_optional_secret_and_passed_to_trainer() -> None:
    serving = {"selector": {"matchLabels": {"app": "vllm"}}}
    keyed = {**serving, "apiKeySecretRef": {"name": "vllm-key", "key": "api-key"}}
    pod = building.build_pod(pools.parse(pool_body(serving=keyed)), 0, SETTINGS)
    c = container(pod)
    assert c["args"][-4:] == [
        "--serving-api-key-file",
        "/etc/lorafleet/serving-api-key/api-key",
        "--serving-api-key-secret",
        "vllm-key/api-key",
    ]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    # Optional: a missing Secret must not keep the trainer (and its training) from starting.
    assert volumes["serving-api-key"]["secret"] == {
        "secretName": "vllm-key",
        "items": [{"key": "api-key", "path": "api-key"}],
        "defaultMode": 0o440,
        "optional": True,
    }
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["serving-api-key"] == {
        "name": "serving-api-key",
        "mountPath": "/etc/lorafleet/serving-api-key",
        "readOnly": True,
    }
    # The key itself is never in the pod spec: no env var carries it.
    assert all("secretKeyRef" not in (e.get("valueFrom") or {}) for e in c["env"])
    defaulted = building.build_pod(
        pools.parse(pool_body(serving={**serving, "apiKeySecretRef": {"name": "vllm-key"}})), 0, SETTINGS
    )
    assert container(defaulted)["args"][-1] == "vllm-key/token"  # the key defaults as authSecretRef's
    for plain in (pool_body(serving=serving), pool_body()):
        no_key = building.build_pod(pools.parse(plain), 0, SETTINGS)
        assert "--serving-api-key-file" not in container(no_key)["args"]
        assert "serving-api-key" not in {v["name"] for v in no_key["spec"]["volumes"]}


def test_storage_pvc_or_empty_dir() -> None:
    pvc = building.build_pod(
        pools.parse(pool_body(storage={"persistentVolumeClaim": {"claimName": "adapters"}})), 0, SETTINGS
    )
    volumes = {v["name"]: v for v in pvc["spec"]["volumes"]}
    assert volumes["adapters"] == {"name": "adapters", "persistentVolumeClaim": {"claimName": "adapters"}}
    mounts = {m["name"]: m["mountPath"] for m in container(pvc)["volumeMounts"]}
    assert mounts["adapters"] == "/var/lib/lorafleet/adapters"
    plain = building.build_pod(pools.parse(pool_body()), 0, SETTINGS)
    plain_volumes = {v["name"]: v for v in plain["spec"]["volumes"]}
    # Without storage the adapters live on an emptyDir that can hold twice the cache (8Gi default).
    assert plain_volumes["adapters"] == {"name": "adapters", "emptyDir": {"sizeLimit": "16384Mi"}}


def test_restricted_pod_security() -> None:
    pod = building.build_pod(pools.parse(pool_body()), 0, SETTINGS)
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(pod)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    # A read-only root needs writable scratch space for the model cache and /tmp.
    mounts = {m["mountPath"] for m in container(pod)["volumeMounts"]}
    assert {"/tmp", "/var/cache/lorafleet"} <= mounts


def test_scheduling_passthrough() -> None:
    pool = pools.parse(
        pool_body(
            nodeSelector={"gpu": "h100"},
            tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            affinity={"nodeAffinity": {}},
        )
    )
    spec = building.build_pod(pool, 0, SETTINGS)["spec"]
    assert spec["nodeSelector"] == {"gpu": "h100"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert spec["affinity"] == {"nodeAffinity": {}}


def test_headless_service() -> None:
    svc = building.build_service(pools.parse(pool_body()), SETTINGS)
    assert svc["metadata"]["name"] == "qwen"
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == {names.POOL_LABEL: "qwen"}
    assert svc["spec"]["ports"][0]["port"] == 8080
    assert svc["metadata"]["ownerReferences"][0]["name"] == "qwen"


def test_bad_pool_spec_names_the_field() -> None:
    with pytest.raises(ValidationError, match="gpuResidency"):
        pools.parse(pool_body(gpuResidency="always"))
    # The CRD's quantity pattern refuses it at parse time, naming the field, before any pod is built.
    with pytest.raises(ValidationError, match=r"cache\.capacity"):
        pools.parse(pool_body(cache={"capacity": "lots"}))


def test_default_resources_follow_what_the_pod_holds() -> None:
    # builtin:tiny is 64Mi of weights: 8Gi cache + 2 x 64Mi + 1Gi overhead.
    c = container(building.build_pod(pools.parse(pool_body(gpu=False)), 0, SETTINGS))
    memory = f"{8 * 1024 + 128 + 1024}Mi"
    assert c["resources"] == {
        "requests": {"cpu": "2", "memory": memory, "ephemeral-storage": "18816Mi"},
        "limits": {"cpu": "2", "memory": memory, "ephemeral-storage": "18816Mi"},
    }
    # A model the operator does not know counts as LORAFLEET_OPERATOR_TRAINER_MODEL_MEMORY (4Gi).
    big = pools.parse(pool_body(baseModel="org/model", cache={"capacity": "2Gi"}, gpu=False))
    assert container(building.build_pod(big, 0, SETTINGS))["resources"]["requests"]["memory"] == "11264Mi"
    sized = OperatorSettings(trainer_cpu="500m", trainer_memory_overhead="512Mi", trainer_model_memory="1Gi")
    requests = container(building.build_pod(big, 0, sized))["resources"]["requests"]
    assert requests["cpu"] == "500m" and requests["memory"] == f"{2048 + 2048 + 512}Mi"
    # With a claim for the adapters, the node's disk holds only the model cache, tmp and logs.
    claimed = pools.parse(pool_body(gpu=False, storage={"persistentVolumeClaim": {"claimName": "c"}}))
    requests = container(building.build_pod(claimed, 0, SETTINGS))["resources"]["requests"]
    assert requests["ephemeral-storage"] == f"{1152 + 1024 + 256}Mi"


def test_every_resource_value_is_overridable_by_the_pool() -> None:
    both = pools.parse(
        pool_body(
            gpu=False, resources={"requests": {"cpu": 4, "memory": "20Gi"}, "limits": {"memory": "24Gi"}}
        )
    )
    res = container(building.build_pod(both, 0, SETTINGS))["resources"]
    del res["requests"]["ephemeral-storage"], res["limits"]["ephemeral-storage"]
    assert res == {"requests": {"cpu": 4, "memory": "20Gi"}, "limits": {"cpu": 4, "memory": "24Gi"}}
    only_limit = pools.parse(pool_body(gpu=False, resources={"limits": {"cpu": "8"}}))
    res = container(building.build_pod(only_limit, 0, SETTINGS))["resources"]
    assert "cpu" not in res["requests"] and res["limits"]["cpu"] == "8"  # Kubernetes copies the limit


def test_every_empty_dir_has_a_size_limit_and_no_token_is_mounted() -> None:
    pod = building.build_pod(pools.parse(pool_body(cache={"capacity": "1Gi"})), 0, SETTINGS)
    sizes = {v["name"]: v["emptyDir"]["sizeLimit"] for v in pod["spec"]["volumes"] if "emptyDir" in v}
    assert sizes == {"adapters": "2048Mi", "model-cache": f"{128 + 1024}Mi", "tmp": "1024Mi"}
    assert pod["spec"]["automountServiceAccountToken"] is False


def test_the_cpu_request_reaches_the_trainer_for_its_threads() -> None:
    c = container(building.build_pod(pools.parse(pool_body()), 0, SETTINGS))
    (item,) = [e for e in c["env"] if e["name"] == "LORAFLEET_TRAINER_CPU_REQUEST_MILLICORES"]
    ref = item["valueFrom"]["resourceFieldRef"]
    assert ref == {"containerName": c["name"], "resource": "requests.cpu", "divisor": "1m"}
