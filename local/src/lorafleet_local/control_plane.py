"""A real Kubernetes control plane on loopback: etcd, kube-apiserver and kube-controller-manager.

The API server enforces RBAC, signs service-account tokens and serves TLS with a throwaway PKI;
the controller manager runs the garbage collector, the deployment/replicaset controllers and the
service-account controllers that the chart's objects need. No node or container runtime exists:
pod_runner plays the kubelet for LoraFleet's pods. `lorafleet-local up` starts both (cli.py).
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from lorafleet_local import checkout, kubeconfigs, pki, polling, processes

BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "helm")
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
# The controllers LoraFleet's objects rely on; the rest would only burn CPU on a 2-core machine.
CONTROLLERS = (
    "garbage-collector-controller",
    "deployment-controller",
    "replicaset-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "namespace-controller",
    "root-ca-certificate-publisher-controller",
    "endpointslice-controller",
)
# With a real node (node.py) rather than the pod runner: claims bind to volumes, the node's
# not-ready taint is lifted once it reports Ready, and kube-scheduler places the pods.
NODE_CONTROLLERS = (
    "persistentvolume-binder-controller",
    "persistentvolume-protection-controller",
    "persistentvolumeclaim-protection-controller",
    "node-lifecycle-controller",
)


def _nothing() -> None:
    return None


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager under one work directory."""

    def __init__(self, workdir: Path, binaries: Path | None = None, node: bool = False) -> None:
        self.workdir = workdir
        self.node = node
        self.bin = binaries or checkout.bin_dir()
        self.kubeconfig = workdir / "admin.kubeconfig"
        self.children: list[processes.Child] = []
        self.pki: pki.Pki | None = None
        self.server = ""
        self.etcd_port = 0

    def start(self, timeout: float = 120.0) -> ControlPlane:
        missing = checkout.missing_binaries(self.bin, BINARIES + (("kube-scheduler",) if self.node else ()))
        if missing:
            raise RuntimeError(f"missing {', '.join(missing)} in {self.bin}: run `make kube-clients tools`")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pki = keys = pki.generate(self.workdir / "pki")
        logs = self.workdir / "logs"
        try:
            self.etcd_port, peer_port, api_port = (processes.free_port() for _ in range(3))
            etcd = self._spawn("etcd", self._etcd_args(self.etcd_port, peer_port), logs)
            polling.eventually("etcd health", self._health_check("etcd"), timeout, 0.2, child=etcd)
            self.server = f"https://127.0.0.1:{api_port}"
            api = self._spawn("kube-apiserver", self._apiserver_args(keys, self.etcd_port, api_port), logs)
            endpoint = kubeconfigs.Endpoint(self.server, keys.ca_cert.read_bytes())
            kubeconfigs.write(
                self.kubeconfig, endpoint, kubeconfigs.client_cert_user(keys.admin_cert, keys.admin_key)
            )
            polling.eventually(
                "kube-apiserver /readyz", self._health_check("kube-apiserver"), timeout, 0.2, child=api
            )
            kcm_config = kubeconfigs.write(
                self.workdir / "controller-manager.kubeconfig",
                endpoint,
                kubeconfigs.client_cert_user(keys.controller_manager_cert, keys.controller_manager_key),
            )
            kcm = self._spawn(
                "kube-controller-manager", self._controller_manager_args(keys, kcm_config), logs
            )
            # Pods need their namespace's default ServiceAccount; its existence shows the KCM works.
            polling.eventually(
                "the default ServiceAccount",
                lambda: self.get("/api/v1/namespaces/default/serviceaccounts/default"),
                timeout,
                0.2,
                child=kcm,
            )
            if self.node:
                self._spawn("kube-scheduler", self._scheduler_args(), logs)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, argv: list[str], logs: Path) -> processes.Child:
        child = processes.Child(name, [str(self.bin / name), *argv], logs / f"{name}.log")
        self.children.append(child)
        return child

    def _etcd_args(self, client_port: int, peer_port: int) -> list[str]:
        peer = f"http://127.0.0.1:{peer_port}"
        client = f"http://127.0.0.1:{client_port}"
        return [
            "--name=lorafleet-local",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=lorafleet-local={peer}",
            # Throwaway data on a shared disk: durability buys nothing and fsyncs cost seconds.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]

    def _apiserver_args(self, keys: pki.Pki, etcd_port: int, port: int) -> list[str]:
        return [
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={keys.serving_cert}",
            f"--tls-private-key-file={keys.serving_key}",
            f"--client-ca-file={keys.ca_cert}",
            "--authorization-mode=RBAC",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={keys.service_account_pub}",
            f"--service-account-signing-key-file={keys.service_account_key}",
            f"--service-cluster-ip-range={pki.SERVICE_CLUSTER_IP_RANGE}",
            # The `kubernetes` Endpoints may not hold a loopback address; nothing here needs it.
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            "--v=1",
        ]

    def _controller_manager_args(self, keys: pki.Pki, kubeconfig: Path) -> list[str]:
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={processes.free_port()}",
            f"--cert-dir={self.workdir / 'controller-manager-certs'}",
            f"--controllers={','.join(CONTROLLERS + (NODE_CONTROLLERS if self.node else ()))}",
            # Each controller acts as its own ServiceAccount, as in a kubeadm cluster.
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={keys.service_account_key}",
            f"--root-ca-file={keys.ca_cert}",
            "--leader-elect=false",
            "--v=1",
        ]

    def _scheduler_args(self) -> list[str]:
        return [
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={processes.free_port()}",
            "--leader-elect=false",
            "--v=1",
        ]

    def restart(
        self,
        name: str,
        *,
        down: float = 0.0,
        timeout: float = 120.0,
        on_down: Callable[[], object] = _nothing,
    ) -> float:
        """kill -9 one component (`etcd` or `kube-apiserver`), call ``on_down`` once it is dead,
        leave it down for ``down`` seconds, start it again with the same flags, data and port;
        returns seconds until it is healthy."""
        old = next(c for c in self.children if c.name == name)
        old.kill()
        on_down()
        time.sleep(down)  # the length of the outage, chosen by the caller
        start = time.monotonic()
        new = processes.Child(name, old.argv, old.log_path)
        self.children[self.children.index(old)] = new
        polling.eventually(f"{name} to be healthy again", self._health_check(name), timeout, 0.2, child=new)
        return time.monotonic() - start

    def _health_check(self, name: str) -> Callable[[], object]:
        """How start() and restart() tell that etcd or the API server serves."""
        if name == "etcd":
            return lambda: _etcd_healthy(self.etcd_port)
        return lambda: self.get("/readyz", raw=True)

    def ssl_context(self) -> ssl.SSLContext:
        assert self.pki is not None, "the control plane is not started"
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        context.load_cert_chain(str(self.pki.admin_cert), str(self.pki.admin_key))
        return context

    def get(self, path: str, raw: bool = False) -> Any:
        """GET an API path as the admin; the decoded JSON (or text), None on 404."""
        try:
            with urllib.request.urlopen(self.server + path, context=self.ssl_context(), timeout=10) as resp:
                body = resp.read().decode()
        except urllib.error.HTTPError as exc:
            exc.close()  # it holds the TLS socket; an unclosed one is a ResourceWarning (an error here)
            if exc.code == 404:
                return None
            raise
        return body if raw else json.loads(body)

    def stop(self) -> None:
        for child in reversed(self.children):
            # The API server drains open watches before it exits; nothing here needs a graceful
            # drain of a throwaway cluster, so it gets a short grace before SIGKILL.
            child.stop(grace=3.0 if child.name == "kube-apiserver" else 10.0)
        self.children.clear()

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _etcd_healthy(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
        return bool(json.loads(resp.read()).get("health") == "true")
