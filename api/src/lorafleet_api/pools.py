"""The TrainerPool spec as a typed model, parsed from a custom resource body.

The CRD schema already enforced types and bounds on the way in; parsing again here gives the
builders typed attributes and applies the same defaults when an object was stored before a field
existed (so the operator never trusts that the API server filled every default). Every default,
bound and choice is the CRD's (``fields``), not a copy of it.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from lorafleet_api import fields, quantities


def _field(path: str, **extra: Any) -> Any:
    """``spec.<path>`` of the TrainerPool CRD as a pydantic field: its default and bounds."""
    limit = fields.spec_field("TrainerPool", path)
    alias = {"alias": limit.name} if fields.snake(limit.name) != limit.name else {}
    return fields.field(limit, **alias, **extra)


def _choice(path: str) -> Any:
    return fields.one_of(fields.spec_field("TrainerPool", path))


class _Spec(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)


class Resources(_Spec):
    requests: dict[str, str | int] = Field(default_factory=dict)
    limits: dict[str, str | int] = Field(default_factory=dict)


class Cache(_Spec):
    capacity: str = _field("cache.capacity")


class ClaimRef(_Spec):
    claim_name: str = Field(alias="claimName", min_length=1)


class Storage(_Spec):
    """A claim shared by the pool's pods, else an emptyDir per pod: ``ephemeral``, which the CRD
    requires a pool to say (a pool stored before that rule may say neither, and is ephemeral)."""

    persistent_volume_claim: ClaimRef | None = Field(default=None, alias="persistentVolumeClaim")
    ephemeral: bool = False

    @property
    def durable(self) -> bool:
        return self.persistent_volume_claim is not None


class SecretRef(_Spec):
    name: str = Field(min_length=1)
    key: str = "token"


class Serving(_Spec):
    """The pool's inference servers: which pods, their port, where they mount the adapter claim,
    and the Secret holding the API key they require (None: they require none)."""

    selector: dict[str, Any]
    port: int = _field("serving.port")
    adapter_root: str | None = _field("serving.adapterRoot")
    api_key_secret_ref: SecretRef | None = Field(default=None, alias="apiKeySecretRef")


class PoolSpec(_Spec):
    """What a TrainerPool asks for."""

    base_model: str = _field("baseModel")
    replicas: int = _field("replicas")
    image: str | None = _field("image")
    gpu: bool = _field("gpu")
    resources: Resources = Field(default_factory=Resources)
    cache: Cache = Field(default_factory=Cache)
    gpu_residency: Annotated[str, _choice("gpuResidency")] = _field("gpuResidency")
    dtype: Annotated[str, _choice("dtype")] | None = _field("dtype")  # None: the trainer's default
    durability: Annotated[str, _choice("durability")] = _field("durability")
    fuse_steps: int = _field("fuseSteps")
    storage: Storage = Field(default_factory=Storage)
    max_adapters_per_pod: int = _field("maxAdaptersPerPod")
    node_selector: dict[str, str] = Field(default_factory=dict, alias="nodeSelector")
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] | None = None
    auth_secret_ref: SecretRef | None = Field(default=None, alias="authSecretRef")
    serving: Serving | None = None

    def cache_capacity_bytes(self) -> int:
        return quantities.to_bytes(self.cache.capacity, field="spec.cache.capacity")


class Pool(_Spec):
    """A TrainerPool's identity and spec: what the builders need."""

    namespace: str
    name: str
    uid: str | None = None
    generation: int | None = None
    spec: PoolSpec


def parse(body: dict[str, Any]) -> Pool:
    """Parse a TrainerPool body; raises pydantic.ValidationError naming the bad field."""
    meta = body.get("metadata", {})
    return Pool(
        namespace=meta.get("namespace", ""),
        name=meta.get("name", ""),
        uid=meta.get("uid"),
        generation=meta.get("generation"),
        spec=PoolSpec.model_validate(body.get("spec") or {}),
    )
