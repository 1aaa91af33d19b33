"""``lorafleet-operator``: run the operator (kopf) with LoraFleet's handlers, metrics and leader election.

Order of start-up: read settings (fail fast), serve /metrics and /healthz, wait to hold the Lease,
then run kopf until a signal arrives or the Lease is lost. A replica that loses the Lease exits
with status 1 so that Kubernetes restarts it as a standby.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import sys
import uuid

import kopf

from lorafleet_operator import credentials, handlers, kube, leading, settings
from lorafleet_operator.metrics import OperatorMetrics, serving
from lorafleet_operator.runtime import Runtime
from lorafleet_operator.trainers import TrainerClient


def lease_identity(pod_name: str | None) -> str:
    """Who holds the Lease: the pod's name in a cluster, so a restarted container (its previous
    process is dead by then) takes its own Lease back at once instead of waiting a whole lease
    duration; outside a cluster the host name plus a random suffix, unique per process."""
    return pod_name or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


async def run(config: settings.OperatorSettings, token: str | None) -> bool:
    """Run until stopped; returns False when the Lease was lost."""
    metrics = OperatorMetrics()
    api = kube.KubeApi(kube.connect(), relogin=kube.connect, timeout=config.api_timeout_seconds)
    trainer_client = TrainerClient(metrics, token=token, timeout=config.trainer_timeout_seconds)
    rt = Runtime(config, api, trainer_client, metrics)
    stop_flag = asyncio.Event()
    holder: asyncio.Task[None] | None = None
    try:
        async with serving(metrics, config.metrics_host, config.metrics_port):
            if config.leader_election:
                identity = lease_identity(os.environ.get("POD_NAME"))
                acquired = asyncio.Event()
                holder = asyncio.create_task(
                    leading.lead(
                        api,
                        namespace=config.lease_namespace,
                        name=config.lease_name,
                        identity=identity,
                        duration=config.lease_duration_seconds,
                        acquired=acquired,
                    )
                )
                waiter = asyncio.create_task(acquired.wait())
                await asyncio.wait({holder, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                holder.add_done_callback(lambda _: stop_flag.set())
            metrics.leader.set(1)
            registry = kopf.OperatorRegistry()
            handlers.register(registry, config)
            namespaces = config.namespace_list
            await kopf.operator(
                registry=registry,
                standalone=True,  # the Lease, not kopf peering, decides who acts
                clusterwide=not namespaces,
                namespaces=namespaces,
                memo=kopf.Memo(runtime=rt),
                stop_flag=stop_flag,
            )
    finally:
        metrics.leader.set(0)
        lost = holder is not None and holder.done()
        if holder is not None:
            holder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await holder
        await rt.close()
    return not lost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lorafleet-operator",
        description="Reconcile TrainerPool and LoraAdapter resources (settings: LORAFLEET_OPERATOR_*).",
    )
    parser.add_argument("--verbose", action="store_true", help="log at DEBUG level")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = settings.load()
        token = config.auth_token()
    except (settings.SettingsError, OSError, ValueError) as exc:
        print(f"lorafleet-operator: {exc}", file=sys.stderr)
        return 2
    try:
        held = asyncio.run(run(config, token))
    except (kube.ApiError, credentials.NoCredentials) as exc:
        print(f"lorafleet-operator: {exc}", file=sys.stderr)
        return 2
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
