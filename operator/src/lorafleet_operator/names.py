"""Names shared by every part of the operator: the API group, resources, labels and finalizer.

Keeping them in one place means the CRDs, the pod builder and the watchers cannot drift apart.
"""

from __future__ import annotations

GROUP = "lorafleet.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
POOLS = "trainerpools"
ADAPTERS = "loraadapters"
POOL_KIND = "TrainerPool"
ADAPTER_KIND = "LoraAdapter"

POOL_LABEL = f"{GROUP}/pool"
ORDINAL_LABEL = f"{GROUP}/ordinal"
# Lets Prometheus tell offload pods (GPU memory must fall back after each step) from keep pods.
RESIDENCY_LABEL = f"{GROUP}/gpu-residency"
FINALIZER = f"{GROUP}/finalizer"
MANAGED_BY = "lorafleet-operator"
CONTAINER = "trainer"
AUTH_MOUNT = "/etc/lorafleet/auth"
AUTH_FILE = f"{AUTH_MOUNT}/token"
SERVING_KEY_MOUNT = "/etc/lorafleet/serving-api-key"
SERVING_KEY_FILE = f"{SERVING_KEY_MOUNT}/api-key"


def pod_name(pool: str, ordinal: int) -> str:
    """The name of a pool's pod: ``<pool>-<ordinal>``."""
    return f"{pool}-{ordinal}"


def ordinal_of(pool: str, pod: str) -> int | None:
    """The ordinal of ``pod`` in ``pool``, or None when the name is not ``<pool>-<int>``."""
    prefix = f"{pool}-"
    if not pod.startswith(prefix):
        return None
    tail = pod[len(prefix) :]
    return int(tail) if tail.isdigit() else None
