"""Faults to inject into a cluster: a crashed container, a lost pod, a restarted control plane.

Each works on the local control plane and, where Kubernetes offers a way, on a real cluster too:

- ``crash_container``: locally the pod's process gets `kill -9` and the pod runner starts it again
  (a container restart); on a real cluster the pod is force-deleted and its controller replaces it.
- ``lose_pod``: the pod's node is gone. Locally its process gets `kill -9` and stays down, then the
  pod object is force-deleted, as the node lifecycle controller would; on a real cluster only the
  force delete is possible (the kubelet then kills the container).
- ``restart``: `kill -9` etcd or the API server and start it again; local only.
"""

from __future__ import annotations

from collections.abc import Callable

from lorafleet_local.kube import Kube


def crash_container(kube: Kube, namespace: str, pod: str) -> None:
    if kube.runner is not None:
        kube.runner.kill(namespace, pod, restart=True)
        return
    _force_delete(kube, namespace, pod)


def lose_pod(kube: Kube, namespace: str, pod: str) -> None:
    if kube.runner is not None:
        kube.runner.kill(namespace, pod, restart=False)
    _force_delete(kube, namespace, pod)


def restart(
    kube: Kube, component: str, *, down: float = 0.0, on_down: Callable[[], object] = lambda: None
) -> float:
    """Restart ``etcd`` or ``kube-apiserver`` after ``down`` seconds; seconds until healthy again.
    ``on_down`` runs the moment the component is dead (see ``ControlPlane.restart``).

    Call it from a thread that outlives the cluster (the main thread): a child process gets its
    parent-death signal when the thread that forked it exits."""
    if kube.plane is None:
        raise RuntimeError(f"restarting {component} needs the local control plane")
    return kube.plane.restart(component, down=down, on_down=on_down)


def _force_delete(kube: Kube, namespace: str, pod: str) -> None:
    kube.kubectl("delete", "pod", pod, "-n", namespace, "--grace-period=0", "--force", "--wait=false")
