"""The local cluster itself, on the real API server: RBAC, garbage collection, and the pod runner.

The runner test uses a stand-in for the trainer program (a few lines of Python that serve
`/readyz` and report their argv and env), so it proves the runner's mechanics without the model.
"""

from __future__ import annotations

import json
import sys
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from lorafleet_local import kubeconfigs, pod_runner
from lorafleet_local.kube import CommandError, Kube
from lorafleet_local.polling import eventually

pytestmark = pytest.mark.e2e

STAND_IN = textwrap.dedent(
    """\
    import argparse, http.server, json, os, sys
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--storage", required=True)
    args = parser.parse_args()
    os.makedirs(args.storage, exist_ok=True)
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"argv": sys.argv, "env": dict(os.environ), "pid": os.getpid()}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    http.server.HTTPServer((args.host, args.port), Handler).serve_forever()
    """
)


def test_rbac_is_enforced_for_service_accounts(kube: Kube, tmp_path: Path) -> None:
    ns = "e2e-rbac"
    kube.kubectl("create", "namespace", ns)
    try:
        kube.kubectl("create", "serviceaccount", "reader", "-n", ns)
        token = kube.kubectl("create", "token", "reader", "-n", ns).stdout.strip()
        # A kubeconfig with only the token: next to the admin's client certificate, x509 would win.
        reader = kubeconfigs.write(
            tmp_path / "reader.kubeconfig",
            kubeconfigs.read_endpoint(kube.kubeconfig),
            kubeconfigs.token_user(token),
        )
        with pytest.raises(CommandError) as denied:
            kube.kubectl("--kubeconfig", str(reader), "get", "configmaps", "-n", ns)
        assert "forbidden" in denied.value.stderr.lower()
        assert "system:serviceaccount:e2e-rbac:reader" in denied.value.stderr
        kube.kubectl("create", "role", "read-cm", "--verb=get,list", "--resource=configmaps", "-n", ns)
        kube.kubectl(
            "create", "rolebinding", "read-cm", "--role=read-cm", f"--serviceaccount={ns}:reader", "-n", ns
        )
        eventually(
            "the RoleBinding to take effect",
            lambda: kube.kubectl("--kubeconfig", str(reader), "get", "cm", "-n", ns),
        )
    finally:
        kube.kubectl("delete", "namespace", ns, "--wait=false")


def test_garbage_collector_deletes_owned_objects(kube: Kube) -> None:
    kube.kubectl("create", "configmap", "e2e-owner", "-n", "default")
    uid = kube.get("configmap", "e2e-owner", "-n", "default")["metadata"]["uid"]
    owned = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "e2e-owned",
            "namespace": "default",
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "e2e-owner", "uid": uid}],
        },
    }
    kube.apply(json.dumps(owned))
    kube.kubectl("delete", "configmap", "e2e-owner", "-n", "default")
    eventually(
        "the owned ConfigMap to be collected",
        lambda: not kube.exists("configmap", "e2e-owned", "-n", "default"),
    )


def _pod(runner_name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "runner-check-0",
            "namespace": "default",
            "labels": {"lorafleet.io/pool": "runner-check"},
            "annotations": {pod_runner.RUNNER_ANNOTATION: runner_name},
        },
        "spec": {
            "containers": [
                {
                    "name": "trainer",
                    "image": "stand-in",
                    "args": ["serve", "--host", "0.0.0.0", "--port", "18080", "--storage", "/data/adapters"],
                    "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                    "ports": [{"name": "http", "containerPort": 18080}],
                    "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}},
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                }
            ],
            "volumes": [{"name": "data", "emptyDir": {}}],
        },
    }


def _info(ip: str) -> Any:
    with urllib.request.urlopen(f"http://{ip}:18080/info", timeout=2) as resp:
        return json.loads(resp.read())


def test_pod_runner_runs_a_pool_pod_reports_it_ready_and_stops_it_on_delete(
    kube: Kube, tmp_path: Path
) -> None:
    if not kube.local:
        pytest.skip("the pod runner exists only on the local control plane (KUBECONFIG is set)")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    program = fake_bin / "lorafleet-trainer"
    program.write_text(f"#!{sys.executable}\n{STAND_IN}")
    program.chmod(0o755)
    runner = pod_runner.PodRunner(
        kube.kubeconfig, tmp_path / "pods", venv_bin=fake_bin, name="stand-in"
    ).start()
    try:
        kube.apply(json.dumps(_pod("stand-in")))
        kube.kubectl("wait", "pod/runner-check-0", "-n", "default", "--for=condition=Ready", "--timeout=60s")
        pod = kube.get("pod", "runner-check-0", "-n", "default")
        ip = pod["status"]["podIP"]
        assert ip.startswith("127.") and ip != "127.0.0.1"
        info = _info(ip)
        assert info["env"]["POD_NAME"] == "runner-check-0"
        storage = info["argv"][info["argv"].index("--storage") + 1]
        assert storage.startswith(str(tmp_path / "pods")) and Path(storage).is_dir()
        assert info["argv"][info["argv"].index("--host") + 1] == ip
        kube.kubectl("delete", "pod", "runner-check-0", "-n", "default")
        eventually("the pod's process to stop", lambda: _refused(ip), timeout=30)
    finally:
        kube.kubectl("delete", "pod", "runner-check-0", "-n", "default", "--ignore-not-found")
        runner.stop()


def _refused(ip: str) -> bool:
    try:
        _info(ip)
    except OSError:
        return True
    return False
