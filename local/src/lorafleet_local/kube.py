"""One handle on "the cluster" for the demo and the tests, whichever cluster that is.

With KUBECONFIG set (a kind cluster, say) it is used as it is and real kubelets run the pods.
Otherwise the local control plane starts under a work directory, with the pod runner playing the
kubelet. Either way the demo and the tests talk to it the way users do: the pinned `kubectl` and `helm`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorafleet_local import checkout, control_plane, kubeconfigs, node, pod_runner, polling, processes

REAL_NODE_ENV = "LORAFLEET_REAL_NODE"  # "1": the tests' local cluster gets a real node (make test-node)


class CommandError(RuntimeError):
    """A kubectl or helm command failed; carries its stderr."""

    def __init__(self, argv: Sequence[str], code: int, stdout: str, stderr: str) -> None:
        super().__init__(f"{' '.join(argv)} exited {code}:\n{stderr.strip() or stdout.strip()}")
        self.stdout, self.stderr, self.code = stdout, stderr, code


class Kube:
    """kubectl/helm against one kubeconfig, plus the local scaffolding when there is any."""

    def __init__(
        self, kubeconfig: Path, workdir: Path, plane: control_plane.ControlPlane | None = None
    ) -> None:
        self.kubeconfig = kubeconfig
        self.workdir = workdir
        self.plane = plane
        self.runner: pod_runner.PodRunner | None = None
        self.node: node.Node | None = None
        # `helm install` values this cluster needs (a real node runs the images `make images` built).
        self.helm_values: list[str] = []
        self.bin = checkout.bin_dir()
        self._forwards: dict[tuple[str, str, int], processes.Child] = {}
        self._forward_urls: dict[tuple[str, str, int], str] = {}

    @property
    def local(self) -> bool:
        """True on a local control plane this handle started (it can restart it, kill pods)."""
        return self.plane is not None

    @property
    def pods_on_loopback(self) -> bool:
        """True on any local cluster, this one's or one `lorafleet-local up` left running: pods are
        reachable from here at their own addresses (the pod runner's loopback addresses, or the
        real node's host-only bridge)."""
        return self.local or kubeconfigs.is_local(self.kubeconfig)

    @classmethod
    def start(cls, workdir: Path, step_holds: bool = False, real_node: bool = False) -> Kube:
        """The KUBECONFIG cluster if set, else a fresh local control plane with a pod runner
        (whose trainer pods accept step holds when ``step_holds``: fault tests only), or with a
        real node (``real_node``: a kubelet running the images `make images` built)."""
        external = os.environ.get("KUBECONFIG")
        if external:
            return cls(Path(external), workdir)
        plane = control_plane.ControlPlane(workdir / "cluster", node=real_node).start()
        kube = cls(plane.kubeconfig, workdir, plane)
        try:
            if real_node:
                kube.node = node.start_for(plane, workdir / "node")
                kube.helm_values = node.helm_values()
            else:
                runner = pod_runner.PodRunner(plane.kubeconfig, workdir / "pods", step_holds=step_holds)
                kube.runner = runner.start()
        except BaseException:
            plane.stop()
            raise
        return kube

    def stop(self) -> None:
        for forward in self._forwards.values():
            forward.stop(grace=2)
        self._forwards.clear()
        if self.runner is not None:
            self.runner.stop()
            self.runner = None
        if self.node is not None:
            self.node.stop()
            self.node = None
        if self.plane is not None:
            self.plane.stop()

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        # helm keeps caches and repository config under HOME by default; keep them in the work dir.
        for var, sub in (
            ("HELM_CACHE_HOME", "cache"),
            ("HELM_CONFIG_HOME", "config"),
            ("HELM_DATA_HOME", "data"),
        ):
            env[var] = str(self.workdir / "helm" / sub)
        return env

    def run(
        self, tool: str, *args: str, input: str | None = None, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bin / tool), *args]
        proc = subprocess.run(
            argv, input=input, capture_output=True, text=True, env=self.env(), timeout=timeout
        )
        if check and proc.returncode != 0:
            raise CommandError(argv, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def kubectl(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run("kubectl", *args, **kwargs)

    def helm(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run("helm", *args, **kwargs)

    def get(self, *args: str) -> Any:
        """`kubectl get ... -o json`, decoded."""
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def exists(self, *args: str) -> bool:
        return self.kubectl("get", *args, "--ignore-not-found", "-o", "name").stdout.strip() != ""

    def apply(self, manifest: str | Path, namespace: str | None = None) -> str:
        ns = ["-n", namespace] if namespace else []
        if isinstance(manifest, Path):
            return self.kubectl("apply", *ns, "-f", str(manifest)).stdout
        return self.kubectl("apply", *ns, "-f", "-", input=manifest).stdout

    def reach(self, namespace: str, pod: str, port: int) -> str:
        """A base URL for a pod's port from this process, as the operator in the cluster sees it.

        On a local cluster that is the pod's own loopback address; on a real cluster the pod
        network is not routable from this machine, so a `kubectl port-forward` stands in.
        """
        if self.pods_on_loopback:
            ip = self.get("pod", pod, "-n", namespace)["status"]["podIP"]
            return f"http://{ip}:{port}"
        key = (namespace, pod, port)
        child = self._forwards.get(key)
        if child is not None and child.alive():
            return self._forward_urls[key]
        local_port = processes.free_port()
        child = processes.Child(
            f"port-forward-{pod}",
            [
                str(self.bin / "kubectl"),
                "port-forward",
                "-n",
                namespace,
                f"pod/{pod}",
                f"{local_port}:{port}",
            ],
            self.workdir / "port-forwards" / f"{namespace}-{pod}-{port}.log",
            env=self.env(),
        )
        self._forwards[key] = child
        self._forward_urls[key] = url = f"http://127.0.0.1:{local_port}"
        polling.eventually(
            f"port-forward to {namespace}/{pod}:{port}", lambda: _connects(local_port), 30, 0.2, child
        )
        return url

    def pod_log(self, namespace: str, pod: str) -> str:
        """A pod's container log: the runner's log file locally, `kubectl logs` on a real cluster."""
        if self.runner is not None:
            worker = self.runner.worker(namespace, pod)
            if worker is None:
                raise LookupError(f"the pod runner runs no pod {namespace}/{pod}")
            return str(worker.log_path.read_text(errors="replace"))
        return self.kubectl("logs", "-n", namespace, pod, "--all-containers").stdout


def _connects(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
