"""Pure builders of the Kubernetes objects a TrainerPool owns: its trainer pods and headless Service.

``build_pod(pool, ordinal, settings)`` returns a plain dict and does no I/O, so every property the
pods must have (GPU request, probes, auth Secret, the servers' API key, storage, the "restricted"
Pod Security Standard) is checked by dict asserts in unit tests, and the same dict is what the API
server receives.
The pods are fit for a shared cluster: requests and limits sized from what they hold (``sizing``),
a ``sizeLimit`` on every emptyDir, and no ServiceAccount token (a trainer never calls the API).
"""

from __future__ import annotations

from typing import Any

from lorafleet_api.pools import Pool, SecretRef
from lorafleet_operator import names, sizing
from lorafleet_operator.settings import OperatorSettings

GPU_RESOURCE = "nvidia.com/gpu"
# The trainer image runs as this unprivileged user; fsGroup makes the volumes writable for it.
RUN_AS_USER = 10001
MODEL_CACHE = "/var/cache/lorafleet"


def labels(pool: Pool, ordinal: int | None = None) -> dict[str, str]:
    """Labels of a pool's objects; pods also carry their ordinal."""
    result = {
        names.POOL_LABEL: pool.name,
        "app.kubernetes.io/name": "lorafleet-trainer",
        "app.kubernetes.io/instance": pool.name,
        "app.kubernetes.io/managed-by": names.MANAGED_BY,
    }
    if ordinal is not None:
        result[names.ORDINAL_LABEL] = str(ordinal)
        result[names.RESIDENCY_LABEL] = pool.spec.gpu_residency
    return result


def owner_reference(pool: Pool) -> dict[str, Any]:
    """Makes the pool the controller of the object, so Kubernetes garbage-collects it with the pool."""
    ref: dict[str, Any] = {
        "apiVersion": names.API_VERSION,
        "kind": names.POOL_KIND,
        "name": pool.name,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    if pool.uid:
        ref["uid"] = pool.uid
    return ref


def trainer_args(pool: Pool, settings: OperatorSettings) -> list[str]:
    """Arguments of ``lorafleet-trainer`` (flags of trainer/src/lorafleet_trainer/cli.py)."""
    args = [
        "serve",
        "--base-model",
        pool.spec.base_model,
        "--host",
        "0.0.0.0",
        "--port",
        str(settings.trainer_port),
        "--storage",
        settings.storage_path,
        "--cache-capacity",
        str(pool.spec.cache_capacity_bytes()),
    ]
    if pool.spec.auth_secret_ref is not None:
        args += ["--auth-token-file", names.AUTH_FILE]
    key = pool.spec.serving.api_key_secret_ref if pool.spec.serving is not None else None
    if key is not None:
        # The Secret's name and key travel too, only so the trainer can name them when it is missing.
        args += ["--serving-api-key-file", names.SERVING_KEY_FILE]
        args += ["--serving-api-key-secret", f"{key.name}/{key.key}"]
    return args


def _resources(pool: Pool, settings: OperatorSettings) -> dict[str, Any]:
    result = sizing.resources(pool, settings)
    if pool.spec.gpu:
        # Extended resources must be equal in requests and limits; one GPU per pod by design.
        result["requests"][GPU_RESOURCE] = 1
        result["limits"][GPU_RESOURCE] = 1
    return result


def _env(pool: Pool) -> list[dict[str, Any]]:
    def field_ref(path: str) -> dict[str, Any]:
        return {"fieldRef": {"fieldPath": path}}

    return [
        {"name": "POD_NAME", "valueFrom": field_ref("metadata.name")},
        {"name": "POD_NAMESPACE", "valueFrom": field_ref("metadata.namespace")},
        {"name": "LORAFLEET_TRAINER_DEVICE", "value": "cuda" if pool.spec.gpu else "cpu"},
        {"name": "LORAFLEET_TRAINER_GPU_RESIDENCY", "value": pool.spec.gpu_residency},
        # Sizes torch's threads where no cgroup CPU quota is visible (the quota wins when it is).
        {
            "name": "LORAFLEET_TRAINER_CPU_REQUEST_MILLICORES",
            "valueFrom": {
                "resourceFieldRef": {
                    "containerName": names.CONTAINER,
                    "resource": "requests.cpu",
                    "divisor": "1m",
                }
            },
        },
        {"name": "LORAFLEET_TRAINER_DTYPE", "value": pool.spec.dtype or "auto"},
        # When a step answers: after its version is durable (sync) or after its in-memory commit.
        {"name": "LORAFLEET_TRAINER_DURABILITY", "value": pool.spec.durability},
        # How many waiting steps of different adapters may run as one fused step.
        {"name": "LORAFLEET_TRAINER_FUSE_STEPS", "value": str(pool.spec.fuse_steps)},
        # The root filesystem is read-only: every cache and scratch path points at an emptyDir.
        {"name": "HF_HOME", "value": f"{MODEL_CACHE}/hf"},
        {"name": "XDG_CACHE_HOME", "value": MODEL_CACHE},
        {"name": "HOME", "value": "/tmp"},
        {"name": "TMPDIR", "value": "/tmp"},
    ]


def _mount_secret_file(
    volumes: list[dict[str, Any]],
    mounts: list[dict[str, Any]],
    name: str,
    ref: SecretRef,
    path: str,
    mount_path: str,
    optional: bool = False,
) -> None:
    """One key of a Secret as the file ``mount_path/path``, readable by the pod's group only."""
    source: dict[str, Any] = {
        "secretName": ref.name,
        "items": [{"key": ref.key, "path": path}],
        "defaultMode": 0o440,
    }
    if optional:
        source["optional"] = True
    volumes.append({"name": name, "secret": source})
    mounts.append({"name": name, "mountPath": mount_path, "readOnly": True})


def _volumes(pool: Pool, settings: OperatorSettings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    claim = pool.spec.storage.persistent_volume_claim
    size = sizing.volume_sizes(pool, settings)
    # Every emptyDir has a sizeLimit: a full one gets its pod evicted, not the node's disk filled.
    adapters: dict[str, Any] = (
        {"persistentVolumeClaim": {"claimName": claim.claim_name}}
        if claim
        else {"emptyDir": {"sizeLimit": size["adapters"]}}
    )
    volumes: list[dict[str, Any]] = [
        {"name": "adapters", **adapters},
        {"name": "model-cache", "emptyDir": {"sizeLimit": size["model-cache"]}},
        {"name": "tmp", "emptyDir": {"sizeLimit": size["tmp"]}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "adapters", "mountPath": settings.storage_path},
        {"name": "model-cache", "mountPath": MODEL_CACHE},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    secret = pool.spec.auth_secret_ref
    if secret is not None:
        _mount_secret_file(volumes, mounts, "auth", secret, "token", names.AUTH_MOUNT)
    key = pool.spec.serving.api_key_secret_ref if pool.spec.serving is not None else None
    if key is not None:
        # A file, not an env var: the kubelet updates it in place when the Secret is created late
        # or rotated, and the trainer reads it on every call. Optional: a missing Secret or key
        # must not keep the pod (and its training) from starting; the trainer reports it instead.
        _mount_secret_file(
            volumes, mounts, "serving-api-key", key, "api-key", names.SERVING_KEY_MOUNT, optional=True
        )
    return volumes, mounts


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def build_pod(pool: Pool, ordinal: int, settings: OperatorSettings) -> dict[str, Any]:
    """The trainer pod ``<pool>-<ordinal>`` of ``pool``."""
    name = names.pod_name(pool.name, ordinal)
    volumes, mounts = _volumes(pool, settings)
    container: dict[str, Any] = {
        "name": names.CONTAINER,
        "image": pool.spec.image or settings.trainer_image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["lorafleet-trainer"],
        "args": trainer_args(pool, settings),
        "env": _env(pool),
        "ports": [{"name": "http", "containerPort": settings.trainer_port, "protocol": "TCP"}],
        # Loading a large base model can take minutes: the startup probe covers it (up to 20 min),
        # so liveness only judges a trainer that has started.
        "startupProbe": _probe("/healthz", 10, 120),
        "livenessProbe": _probe("/healthz", 10, 3),
        "readinessProbe": _probe("/readyz", 5, 3),
        "resources": _resources(pool, settings),
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    spec: dict[str, Any] = {
        "hostname": name,
        "subdomain": pool.name,  # with the headless Service: <pod>.<pool>.<ns>.svc resolves
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 30,
        # A trainer never calls the Kubernetes API: no token to steal from it.
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if pool.spec.node_selector:
        spec["nodeSelector"] = dict(pool.spec.node_selector)
    if pool.spec.tolerations:
        spec["tolerations"] = [dict(t) for t in pool.spec.tolerations]
    if pool.spec.affinity:
        spec["affinity"] = dict(pool.spec.affinity)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": pool.namespace,
            "labels": labels(pool, ordinal),
            "ownerReferences": [owner_reference(pool)],
        },
        "spec": spec,
    }


def build_service(pool: Pool, settings: OperatorSettings) -> dict[str, Any]:
    """The pool's headless Service: stable DNS names for its pods, Ready or not."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": pool.name,
            "namespace": pool.namespace,
            "labels": labels(pool),
            "ownerReferences": [owner_reference(pool)],
        },
        "spec": {
            "clusterIP": "None",
            "selector": {names.POOL_LABEL: pool.name},
            "publishNotReadyAddresses": True,
            "ports": [
                {"name": "http", "port": settings.trainer_port, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }
