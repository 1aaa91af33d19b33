"""Operator settings: one pydantic-settings object read from ``LORAFLEET_OPERATOR_*`` variables.

Everything an operator replica needs to know that is not in a custom resource lives here: the
default trainer image, the trainer port, which namespaces to watch, timing of re-placement and
eviction, the metrics port and the trainer auth token file. It is loaded once, at start-up, and
fails fast naming the full environment variable that was wrong.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "LORAFLEET_OPERATOR_"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$"


class OperatorSettings(BaseSettings):
    """Settings of one operator replica (every field is ``LORAFLEET_OPERATOR_<FIELD>``)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    trainer_image: str = Field(default="ghcr.io/lorafleet/trainer:0.1.0", min_length=1)
    trainer_port: int = Field(default=8080, ge=1, le=65535)
    storage_path: str = Field(default="/var/lib/lorafleet/adapters", min_length=1)
    # Trainer pod sizing (sizing.py has the formula); a pool's `resources` overrides each value.
    trainer_cpu: str = Field(default="2", pattern=r"^[0-9]+(\.[0-9]+)?m?$")
    trainer_memory_overhead: str = Field(default="1Gi", pattern=QUANTITY)
    # Host bytes of a base model the operator does not know (the builtin models' sizes are known).
    trainer_model_memory: str = Field(default="4Gi", pattern=QUANTITY)
    trainer_tmp_size: str = Field(default="1Gi", pattern=QUANTITY)
    # Comma-separated namespaces to watch; empty means every namespace.
    namespaces: str = ""
    # How long a placed adapter's pod may stay not-Ready before the adapter moves elsewhere.
    replace_grace_seconds: float = Field(default=60.0, ge=0)
    # How long deletion keeps retrying the cache eviction before releasing the finalizer anyway.
    eviction_timeout_seconds: float = Field(default=60.0, ge=0)
    # Periodic re-check of every pool and adapter (pods can vanish without an event we see).
    resync_seconds: float = Field(default=30.0, gt=0)
    # First retry delay of a Pending adapter; doubles per retry up to the maximum.
    pending_backoff_seconds: float = Field(default=2.0, gt=0)
    pending_backoff_max_seconds: float = Field(default=60.0, gt=0)
    trainer_timeout_seconds: float = Field(default=10.0, gt=0)
    # Per-request timeout of Kubernetes API calls (watches are kopf's and not affected).
    api_timeout_seconds: float = Field(default=30.0, gt=0)
    metrics_host: str = "0.0.0.0"
    metrics_port: int = Field(default=8000, ge=0, le=65535)
    # The bearer token for the trainer API; the same token the pools' auth Secrets hold.
    auth_token_file: Path | None = None
    # Chart-wide switch: delete stored weights on delete even for adapters with deletionPolicy Retain.
    delete_stored_weights: bool = False
    # Leader election through a coordination.k8s.io Lease, so one replica acts at a time.
    leader_election: bool = True
    lease_name: str = Field(default="lorafleet-operator", min_length=1)
    lease_namespace: str = "default"
    lease_duration_seconds: float = Field(default=15.0, gt=0)

    @property
    def namespace_list(self) -> list[str]:
        """The watched namespaces; an empty list means cluster-wide."""
        return [part.strip() for part in self.namespaces.split(",") if part.strip()]

    def auth_token(self) -> str | None:
        """The trainer bearer token, read from the token file (None when no file is configured)."""
        if self.auth_token_file is None:
            return None
        token = self.auth_token_file.read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"{ENV_PREFIX}AUTH_TOKEN_FILE: {self.auth_token_file} is empty")
        return token


class SettingsError(ValueError):
    """A settings variable was wrong; the message names the full environment variable."""


def load() -> OperatorSettings:
    """Read the settings from the environment, or raise SettingsError naming each bad variable."""
    try:
        return OperatorSettings()
    except ValidationError as exc:
        problems = [
            f"{ENV_PREFIX}{'_'.join(str(part) for part in error['loc']).upper()}: {error['msg']}"
            for error in exc.errors()
        ]
        raise SettingsError("; ".join(problems)) from None
