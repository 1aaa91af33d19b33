"""An ``exec`` credential plugin whose tokens the caller can make invalid at a moment it chooses.

Each run asks the API server for a fresh ServiceAccount token (TokenRequest, as ``kubectl create
token`` does), bound to a Secret the run creates for it. Deleting that Secret makes the API server
refuse the token at once, as it refuses an expired one, so a test proves that a client renews its
login without waiting out TokenRequest's 10-minute minimum. Every run appends what it issued to a
log, so the test knows which tokens exist and which Secret ends each one.

Run as ``python -m lorafleet_local.exec_credentials ...`` from a kubeconfig's ``users[].exec``
(``kubeconfig`` writes one).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet_local import kubeconfigs

API_VERSION = "client.authentication.k8s.io/v1"
LABEL = "lorafleet.io/exec-login"  # on the Secrets tokens are bound to
TOKEN_LIFETIME = datetime.timedelta(minutes=10)  # TokenRequest's shortest: the API server's own expiry
# The official Python client treats a credential that expires within 5 minutes as expired
# (EXPIRY_SKEW_PREVENTION_DELAY) and would run the plugin before every request. Announcing an
# expiry just past that margin makes it renew on its own every RENEW_AFTER instead, while a
# revoked token still reaches the API server and gets its 401.
CLIENT_MARGIN = datetime.timedelta(minutes=5)
RENEW_AFTER = datetime.timedelta(seconds=30)


@dataclass(frozen=True)
class Issued:
    """One token a run handed out."""

    token: str
    secret: str  # the Secret it is bound to: deleting it invalidates the token
    at: datetime.datetime  # when the API server answered the TokenRequest
    expires: datetime.datetime  # the API server's own expiry of the token
    announced: datetime.datetime  # the expirationTimestamp the client was told


def _timestamp(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def issue(kubectl: Path, admin: Path, namespace: str, account: str) -> Issued:
    """Create a Secret and a token of ``account`` bound to it, as the admin of ``admin``."""
    base = [str(kubectl), "--kubeconfig", str(admin), "-n", namespace]
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"generateName": "exec-login-", "labels": {LABEL: account}},
    }
    created = _run([*base, "create", "-f", "-", "-o", "json"], json.dumps(secret))
    name = str(created["metadata"]["name"])
    seconds = int(TOKEN_LIFETIME.total_seconds())
    answer = _run(
        [*base, "create", "token", account, "--bound-object-kind", "Secret",
         "--bound-object-name", name, f"--duration={seconds}s", "-o", "json"],
    )  # fmt: skip
    status = answer["status"]
    expires = _parse(str(status["expirationTimestamp"]))
    at = datetime.datetime.now(datetime.UTC)
    # Whole seconds, rounded up: the client then renews no sooner than RENEW_AFTER from now.
    announced = (at + CLIENT_MARGIN + RENEW_AFTER).replace(microsecond=0) + datetime.timedelta(seconds=1)
    return Issued(str(status["token"]), name, at, expires, min(expires, announced))


def _run(argv: list[str], stdin: str | None = None) -> Any:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} ... exited {proc.returncode}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def record(log: Path, issued: Issued) -> None:
    """Append one line; a single O_APPEND write, as concurrent runs (the operator's threads and
    kopf's login) may log at once."""
    line = json.dumps(
        {
            "token": issued.token,
            "secret": issued.secret,
            "at": issued.at.isoformat(),
            "expires": _timestamp(issued.expires),
            "announced": _timestamp(issued.announced),
        }
    )
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def read_log(log: Path) -> list[Issued]:
    """Every token issued so far, oldest first."""
    if not log.exists():
        return []
    issued = []
    for line in log.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            issued.append(
                Issued(
                    entry["token"],
                    entry["secret"],
                    _parse(entry["at"]),
                    _parse(entry["expires"]),
                    _parse(entry["announced"]),
                )
            )
    return issued


def kubeconfig(path: Path, admin: Path, kubectl: Path, namespace: str, account: str, log: Path) -> Path:
    """A kubeconfig for ``admin``'s API server whose user is this plugin, logging to ``log``."""
    argv = [
        "-m", "lorafleet_local.exec_credentials", "--kubectl", str(kubectl), "--admin-kubeconfig", str(admin),
        "--namespace", namespace, "--service-account", account, "--log", str(log),
    ]  # fmt: skip
    plugin = {"apiVersion": API_VERSION, "command": sys.executable, "args": argv, "interactiveMode": "Never"}
    return kubeconfigs.write(path, kubeconfigs.read_endpoint(admin), {"exec": plugin})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="An exec credential plugin with revocable tokens.")
    parser.add_argument("--kubectl", type=Path, required=True)
    parser.add_argument("--admin-kubeconfig", type=Path, required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--service-account", required=True)
    parser.add_argument("--log", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        issued = issue(args.kubectl, args.admin_kubeconfig, args.namespace, args.service_account)
    except (RuntimeError, OSError, subprocess.TimeoutExpired, ValueError, KeyError) as exc:
        # The client logs the plugin's stderr and exit status; the operator then says it has no user.
        print(f"exec_credentials: {exc}", file=sys.stderr)
        return 1
    record(args.log, issued)
    status = {"token": issued.token, "expirationTimestamp": _timestamp(issued.announced)}
    print(json.dumps({"apiVersion": API_VERSION, "kind": "ExecCredential", "status": status}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
