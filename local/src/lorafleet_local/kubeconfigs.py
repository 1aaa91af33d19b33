"""Kubeconfig files for the local control plane: the admin's, the controller manager's, and the
token-based ones the pod runner gives the operator pod (so it acts as its own ServiceAccount).

Credentials are embedded as base64 data rather than file paths, so a kubeconfig stays valid when
it is copied or read by a process with another working directory.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# The cluster, user and context name of every kubeconfig written here: it tells a local cluster.
NAME = "lorafleet-local"


@dataclass(frozen=True)
class Endpoint:
    """Where the API server is and the CA that signed its serving certificate (PEM bytes)."""

    server: str
    ca_pem: bytes


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def write(
    path: Path,
    endpoint: Endpoint,
    user: dict[str, Any],
    name: str = NAME,
    ca_file: Path | None = None,
) -> Path:
    """Write a one-context kubeconfig; user holds client-certificate-data/client-key-data, a token
    or an exec plugin.

    With ca_file the CA is written there and referenced by path, as a pod sees it (a mounted file).
    """
    cluster: dict[str, str] = {"server": endpoint.server}
    if ca_file is not None:
        ca_file.parent.mkdir(parents=True, exist_ok=True)
        ca_file.write_bytes(endpoint.ca_pem)
        cluster["certificate-authority"] = str(ca_file)
    else:
        cluster["certificate-authority-data"] = _b64(endpoint.ca_pem)
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": cluster}],
        "users": [{"name": name, "user": user}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
        "current-context": name,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.chmod(0o600)
    tmp.replace(path)
    return path


def client_cert_user(cert: Path, key: Path) -> dict[str, str]:
    return {"client-certificate-data": _b64(cert.read_bytes()), "client-key-data": _b64(key.read_bytes())}


def token_user(token: str) -> dict[str, str]:
    return {"token": token}


def read_endpoint(path: Path) -> Endpoint:
    """The current context's server and CA from an existing kubeconfig."""
    config = yaml.safe_load(path.read_text())
    context_name = config["current-context"]
    context = next(c["context"] for c in config["contexts"] if c["name"] == context_name)
    cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
    if "certificate-authority-data" in cluster:
        ca = base64.b64decode(cluster["certificate-authority-data"])
    else:
        ca = Path(cluster["certificate-authority"]).read_bytes()
    return Endpoint(server=cluster["server"], ca_pem=ca)


def is_local(path: Path) -> bool:
    """Whether a kubeconfig's current context is a local cluster's (`lorafleet-local up`)."""
    config = yaml.safe_load(path.read_text())
    return bool(config.get("current-context") == NAME)
