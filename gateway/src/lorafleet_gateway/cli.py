"""``lorafleet-gateway``: serve the gateway, reading where adapters live from the Kubernetes API."""

from __future__ import annotations

import argparse

import uvicorn
from pydantic import ValidationError

from lorafleet_gateway.app import build, create_app
from lorafleet_gateway.directory import KubeDirectory
from lorafleet_gateway.settings import GatewaySettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorafleet-gateway", description=__doc__)
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--tokens-file")
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = GatewaySettings(**given)
    except ValidationError as exc:
        parser.exit(2, f"lorafleet-gateway: {exc}\n")
    app = create_app(build(settings, KubeDirectory(settings.namespace_list())))
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    return 0
