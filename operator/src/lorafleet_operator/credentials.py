"""Where the operator's Kubernetes credentials come from: the official client's own loaders.

In a pod: its service account (the loader re-reads the token file as the kubelet rotates it).
Elsewhere: the kubeconfig kubectl would use (``KUBECONFIG``, read at each login, else
``~/.kube/config``) with whatever its user holds: client certificates, a bearer token or token file,
an ``exec`` credential plugin, an auth provider. A credential that says when it expires is renewed
by the loader before it does; one revoked or expired unannounced gets a 401 from the API server,
and the caller logs in again (``KubeApi``'s relogin, kopf's own re-login through ``kopf_login``).

kopf logs in through the same loader, so the operator's own calls and kopf's watches always act
as one user.
"""

from __future__ import annotations

import os
from typing import Any

import kopf
from kubernetes import client, config


class NoCredentials(Exception):
    """Neither a service account nor a kubeconfig gave credentials to log in with."""


def load() -> client.Configuration:
    """A client Configuration holding the credentials; raises NoCredentials saying why not."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
        return configuration
    except config.ConfigException as exc:
        in_cluster = str(exc)
    path = os.environ.get("KUBECONFIG") or "~/.kube/config"
    try:
        # persist_config=False: an operator never rewrites the kubeconfig it was given.
        config.load_kube_config(config_file=path, client_configuration=configuration, persist_config=False)
    except (config.ConfigException, OSError, ValueError) as exc:
        raise NoCredentials(
            f"no Kubernetes credentials: in a cluster: {in_cluster}; kubeconfig {path}: {exc}"
        ) from exc
    if not (configuration.api_key or configuration.cert_file or configuration.username):
        # The loader logs a failed exec plugin and goes on without a user; every request would
        # then be anonymous and refused, with nothing saying why.
        raise NoCredentials(
            f"kubeconfig {path}: its user gave no credentials (a failed exec plugin logs why above)"
        )
    return configuration


def connection_info(configuration: client.Configuration) -> kopf.ConnectionInfo:
    """The same credentials in kopf's terms."""
    # Calling the getter (not reading api_key) runs the loader's refresh hook first.
    header = configuration.get_api_key_with_prefix("BearerToken", alias="authorization") or ""
    scheme, _, token = header.rpartition(" ")
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        scheme=scheme or None,
        token=token or None,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )


def kopf_login(**_: Any) -> kopf.ConnectionInfo:
    """kopf's login handler: called at start and again after kopf's requests get a 401."""
    return connection_info(load())
