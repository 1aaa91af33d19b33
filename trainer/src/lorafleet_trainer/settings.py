"""The trainer service's one settings object, read from ``LORAFLEET_TRAINER_*`` and CLI flags.

Every ``lorafleet-trainer serve`` flag has an environment variable of the same name (``--max-queue``
is ``LORAFLEET_TRAINER_MAX_QUEUE``) so a pod spec can set either. Flags win over the environment.
Invalid values stop the process before anything loads, with an error naming the flag or the full
variable that held the bad value.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "LORAFLEET_TRAINER_"

# Kubernetes quantity suffixes, so `cache.capacity: 48Gi` from a TrainerPool passes through as is.
_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi|Ti|Pi|k|K|M|G|T|P)?\s*$")
_SUFFIX_BYTES = {
    None: 1,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
}


def parse_bytes(value: Any) -> int:
    """Bytes from an integer or a Kubernetes quantity string such as ``48Gi`` or ``500M``."""
    if isinstance(value, bool):
        raise ValueError("must be a byte count or a quantity such as 8Gi")
    if isinstance(value, int):
        out = value
    else:
        match = _QUANTITY.fullmatch(str(value))
        if match is None:
            raise ValueError(f"{value!r} is not a byte count or a quantity such as 8Gi")
        out = int(float(match.group(1)) * _SUFFIX_BYTES[match.group(2)])
    if out < 0:
        raise ValueError("must not be negative")
    return out


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Padded tokens (rows x longest row) of one forward pass of a step; more run as micro-batches.
DEFAULT_STEP_TOKEN_BUDGET = 16384


class TrainerSettings(BaseSettings):
    """Everything `lorafleet-trainer serve` can be told; field names are the flags' names."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    base_model: str = Field("builtin:tiny", min_length=1, description="HF id, local path or builtin:tiny")
    host: str = Field("127.0.0.1", min_length=1, description="listen address (0.0.0.0 in a pod)")
    port: int = Field(8080, ge=0, le=65535, description="listen port (0 picks a free one)")
    storage: Path = Field(Path("/var/lib/lorafleet/adapters"), description="adapter store root")
    keep_versions: int = Field(3, ge=1, le=1000, description="committed versions kept per adapter")
    step_token_budget: int = Field(
        DEFAULT_STEP_TOKEN_BUDGET,
        ge=1,
        le=1 << 24,
        description="padded tokens (rows x longest row) of one forward pass of a step: a step's "
        "samples run as padded batches, split into micro-batches past this (same result, less memory)",
    )
    served_base_model_name: str | None = Field(
        None,
        min_length=1,
        description="base_model_name_or_path in exported adapters: the name inference servers "
        "serve the base model under (default: --base-model)",
    )
    model_cache_dir: Path | None = Field(None, description="where models are cached (default: HF_HOME)")
    cache_capacity: int = Field(8 * 2**30, description="CPU adapter cache bytes, e.g. 48Gi")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gpu_residency: Literal["offload", "keep"] = Field(
        "offload", description="offload: the GPU holds nothing between steps (shared GPU); keep: base stays"
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="base weights' dtype (LoRA and AdamW stay float32); auto: bfloat16 on CUDA, else float32",
    )
    durability: Literal["sync", "async"] = Field(
        "sync",
        description="sync: a step answers once its version is durable; async: once it is committed in "
        "memory, a background writer persisting the newest version of each adapter (a crash loses the "
        "versions past each adapter's durable_version)",
    )
    write_backlog: int = Field(
        16,
        ge=1,
        le=100_000,
        description="durability async: versions the background writer may hold; a step waits for room",
    )
    max_queue: int = Field(32, ge=1, le=100_000, description="distill steps waiting before 429")
    fuse_steps: int = Field(
        8,
        ge=1,
        le=256,
        description="distill steps of different adapters waiting together that run as one fused step "
        "(same LoRA shape: one forward and backward, each adapter its own update); 1 turns fusing off",
    )
    max_generate_tokens: int = Field(
        512, ge=1, le=65536, description="most tokens one generate request may ask for (max_tokens)"
    )
    max_body_bytes: int = Field(16 * 2**20, ge=1024, description="largest request body, e.g. 16Mi")
    auth_token_file: Path | None = Field(None, description="file holding the bearer token for /v1")
    serving_api_key_file: Path | None = Field(
        None,
        description="file holding the API key the inference servers require (vLLM's --api-key), "
        "read again on every call to them (a mounted Secret may appear or change later)",
    )
    serving_api_key_secret: str | None = Field(
        None,
        min_length=1,
        max_length=507,
        description="the Secret and key (name/key) that file comes from: named when it is missing",
    )
    threads: int | None = Field(
        None, ge=1, le=4096, description="torch intra-op threads (default: from the cgroup CPU quota)"
    )
    cpu_request_millicores: int | None = Field(
        None, ge=1, description="the container's CPU request; sizes the threads when no quota applies"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    shutdown_timeout: float = Field(
        120.0, gt=0, description="seconds SIGTERM waits for the running step before closing connections"
    )
    test_hold_dir: Path | None = Field(
        None,
        description="test only: a step parks before phase P while DIR/P exists (see engine/holds.py); "
        "refused unless --host is a loopback address",
    )

    @field_validator("test_hold_dir")
    @classmethod
    def _holds_on_loopback_only(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        # A trainer that a network can reach is a production trainer: it never parks its steps.
        host = info.data.get("host", "")
        if value is not None and not _is_loopback(host):
            raise ValueError(f"is for tests only and refused with host {host!r}; it needs a loopback host")
        return value

    @field_validator("cache_capacity", "max_body_bytes", mode="before")
    @classmethod
    def _quantity(cls, value: Any) -> int:
        return parse_bytes(value)


class SettingsError(Exception):
    """A setting was invalid; the message names the flag or environment variable."""


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def load(cli: Mapping[str, Any] | None = None, env_file: Path | None = None) -> TrainerSettings:
    """Settings from the environment, overridden by ``cli`` (field -> value, only flags given)."""
    cli = dict(cli or {})
    try:
        return TrainerSettings(_env_file=env_file, **cli)  # type: ignore[call-arg]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            source = flag_name(field) if field in cli else env_name(field)
            problems.append(f"{source}: {error['msg']}")
        raise SettingsError("; ".join(problems)) from None
