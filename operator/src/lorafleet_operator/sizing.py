"""What a trainer pod holds, and the CPU, memory and scratch space that follow from it.

A trainer keeps its base model and a CPU cache of adapters (LoRA weights and AdamW state, up to
``spec.cache.capacity``) in host memory, so a pod without requests is BestEffort and the first one
the kubelet kills. The defaults, each overridable through the pool's ``resources``:

- memory request = limit = cache capacity + 2 x model bytes + overhead. The model twice: loading
  holds the checkpoint's tensors and the built model at once. The overhead (Python, torch, the
  tokenizer, a step's activations on the CPU) is ``LORAFLEET_OPERATOR_TRAINER_MEMORY_OVERHEAD``.
  The limit equals the request: the cache fills to its capacity by design, so any headroom above
  the request would be taken from the node's other pods.
- cpu request = limit = ``LORAFLEET_OPERATOR_TRAINER_CPU``; the trainer sizes its threads to that
  quota, so the limit costs no throttling.
- ephemeral-storage request = limit = the emptyDirs' sizes + 256Mi (logs; the root is read-only).
- emptyDir sizes: model cache = 2 x model bytes + 1Gi (a download and its converted copy), adapters
  (a pool without storage) = 2 x cache capacity (every version the cache could hold, and a new one
  written beside it), tmp = ``LORAFLEET_OPERATOR_TRAINER_TMP_SIZE``.

Model bytes are known for the builtin models; any other model is taken to be
``LORAFLEET_OPERATOR_TRAINER_MODEL_MEMORY`` (set the pool's ``resources`` for a larger one).
When a pool sets only a limit, the request is left out, and Kubernetes makes it equal the limit.
"""

from __future__ import annotations

import math
from typing import Any

from lorafleet_api import quantities
from lorafleet_api.pools import Pool
from lorafleet_operator.settings import OperatorSettings

GI = 2**30
MI = 2**20
LOGS = 256 * MI  # container logs: the root filesystem is read-only, the emptyDirs hold the rest
# Host bytes of the builtin models' float32 weights (builtin:tiny is a few million parameters).
BUILTIN_MODEL_BYTES = {"builtin:tiny": 64 * MI, "builtin:smollm2": 540 * MI}


def model_bytes(pool: Pool, settings: OperatorSettings) -> int:
    known = BUILTIN_MODEL_BYTES.get(pool.spec.base_model)
    if known is not None:
        return known
    return quantities.to_bytes(settings.trainer_model_memory, field="LORAFLEET_OPERATOR_TRAINER_MODEL_MEMORY")


def mebibytes(n: int) -> str:
    """A byte count as a quantity, rounded up to whole MiB (what kubectl shows readably)."""
    return f"{math.ceil(n / MI)}Mi"


def memory_bytes(pool: Pool, settings: OperatorSettings) -> int:
    overhead = quantities.to_bytes(
        settings.trainer_memory_overhead, field="LORAFLEET_OPERATOR_TRAINER_MEMORY_OVERHEAD"
    )
    return pool.spec.cache_capacity_bytes() + 2 * model_bytes(pool, settings) + overhead


def volume_sizes(pool: Pool, settings: OperatorSettings) -> dict[str, str]:
    """``sizeLimit`` of each emptyDir, by volume name."""
    tmp = quantities.to_bytes(settings.trainer_tmp_size, field="LORAFLEET_OPERATOR_TRAINER_TMP_SIZE")
    return {
        "adapters": mebibytes(2 * pool.spec.cache_capacity_bytes()),
        "model-cache": mebibytes(2 * model_bytes(pool, settings) + GI),
        "tmp": mebibytes(tmp),
    }


def resources(pool: Pool, settings: OperatorSettings) -> dict[str, dict[str, Any]]:
    """Requests and limits: the defaults above, with every key the pool sets taking precedence."""
    volumes = volume_sizes(pool, settings)
    if pool.spec.storage.persistent_volume_claim is not None:
        del volumes["adapters"]  # on the claim, not on the node's disk
    scratch = sum(quantities.to_bytes(size, field="sizeLimit") for size in volumes.values()) + LOGS
    defaults = {
        "cpu": settings.trainer_cpu,
        "memory": mebibytes(memory_bytes(pool, settings)),
        "ephemeral-storage": mebibytes(scratch),
    }
    requests: dict[str, Any] = dict(pool.spec.resources.requests)
    limits: dict[str, Any] = dict(pool.spec.resources.limits)
    for key, default in defaults.items():
        if key in requests:
            limits.setdefault(key, requests[key])  # one value given: it is both
        elif key not in limits:
            requests[key] = limits[key] = default
    return {"requests": requests, "limits": limits}
