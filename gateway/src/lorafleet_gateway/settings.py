"""The gateway's settings: flags or ``LORAFLEET_GATEWAY_*`` variables, refused by name when bad."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "LORAFLEET_GATEWAY_"


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8090, ge=1, le=65535)
    tokens_file: Path | None = Field(
        None,
        description="JSON {token: [namespace, ...]} ('*' for all); without it the gateway is open, "
        "which only loopback use should be",
    )
    trainer_token_file: Path | None = Field(None, description="the trainers' bearer token (internal)")
    record_max_bytes: int = Field(64 * 2**20, ge=0, description="the completion record's bound")
    record_ttl_seconds: float = Field(3600.0, gt=0, description="how long a completion stays recorded")
    latest_wait_seconds: float = Field(
        2.0, ge=0, description="how long a chat waits for a server to serve the adapter's latest version"
    )
    upstream_timeout_seconds: float = Field(300.0, gt=0)
    namespaces: str = Field(
        "", description="comma-separated namespaces whose adapters the gateway serves; empty: all"
    )

    def namespace_list(self) -> list[str]:
        return [n.strip() for n in self.namespaces.split(",") if n.strip()]
