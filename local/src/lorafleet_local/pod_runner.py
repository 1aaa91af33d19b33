"""The local cluster's kubelet: runs LoraFleet's Pods as local processes on a control plane with no nodes.

It watches Pods through the API server; for each pod that pod_specs recognises (trainer pods of a
pool, the chart's operator pod, vLLM server pods) a worker thread gives it its own loopback address
(127.X.Y.Z), materialises its Secret/ConfigMap volumes, starts the program with the pod's own args and env,
and reports `podIP`, `phase` and the Ready/ContainersReady conditions from polling the pod's
readiness probe. The operator pod gets a kubeconfig holding a TokenRequest token of its own
ServiceAccount, bound to the pod, so it runs under the chart's RBAC and never as the admin.
Deleting the pod stops the process. The operator and the trainers do not know this exists.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import random
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kubernetes
import urllib3

from lorafleet_local import kubeconfigs, pod_specs, processes

VENV_BIN = Path(sys.executable).parent
# vLLM's own virtualenv (`make vllm`), beside the project's: vLLM pins another transformers.
VLLM_VENV = Path(os.environ.get("LORAFLEET_VLLM_VENV", VENV_BIN.parent.parent / ".venv-vllm"))
RUNNER_ANNOTATION = "local.lorafleet.io/runner"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PodRunner:
    """Watches all namespaces and keeps one PodWorker per recognised, undeleted pod."""

    def __init__(
        self,
        kubeconfig: Path,
        workdir: Path,
        venv_bin: Path = VENV_BIN,
        name: str = "",
        step_holds: bool = False,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.step_holds = step_holds  # fault tests only: trainer pods accept step holds
        self.name = name
        self.endpoint = kubeconfigs.read_endpoint(kubeconfig)
        self.workdir = workdir
        self.venv_bin = venv_bin
        self.api = kubernetes.client.CoreV1Api(kubernetes.config.new_client_from_config(str(kubeconfig)))
        self.workers: dict[str, PodWorker] = {}
        self.lock = threading.RLock()  # PodWorker() allocates an address while _handle holds it
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch_loop, name="pod-runner-watch", daemon=True)
        # A random second octet keeps two runners on one shared machine off each other's addresses.
        self._octet = random.randrange(64, 192)
        self._next_ip = 0

    def start(self) -> PodRunner:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        with self.lock:
            workers = list(self.workers.values())
            self.workers.clear()
        for worker in workers:
            worker.stop()
        # The watch thread notices `stopping` at its next event or its 20 s watch timeout; waiting
        # for that would only slow teardown. It starts no processes, so it may outlive stop().
        self.thread.join(timeout=1)

    def allocate_ip(self) -> str:
        with self.lock:
            self._next_ip += 1
            n = self._next_ip
        return f"127.{self._octet}.{n // 250}.{n % 250 + 2}"

    def worker(self, namespace: str, name: str) -> PodWorker | None:
        with self.lock:
            return next(
                (w for w in self.workers.values() if (w.namespace, w.name) == (namespace, name)), None
            )

    def kill(self, namespace: str, name: str, *, restart: bool) -> None:
        """kill -9 a pod's process. ``restart``: the worker starts it again, as a kubelet restarts a
        crashed container; otherwise it stays down, as on a node that is gone."""
        worker = self.worker(namespace, name)
        if worker is None:
            raise LookupError(f"the pod runner runs no pod {namespace}/{name}")
        worker.kill(restart=restart)

    def _watch_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                # Raw JSON keeps the API's camelCase, which pod_specs reads.
                response: Any = self.api.list_pod_for_all_namespaces(_preload_content=False)
                listing = json.loads(response.data)
                seen = set()
                for pod in listing["items"]:
                    seen.add(pod["metadata"]["uid"])
                    self._handle("ADDED", pod)
                with self.lock:
                    gone = [uid for uid in self.workers if uid not in seen]
                for uid in gone:
                    self._drop(uid)
                stream = kubernetes.watch.Watch().stream(
                    self.api.list_pod_for_all_namespaces,
                    resource_version=listing["metadata"]["resourceVersion"],
                    timeout_seconds=20,
                )
                for event in stream:
                    if self.stopping.is_set():
                        break
                    self._handle(event["type"], event["raw_object"])
            except Exception as exc:  # a watch that expires (410) or drops: list again
                if not self.stopping.is_set():
                    print(f"pod-runner: watch restarted after {exc!r}", file=sys.stderr)
                    self.stopping.wait(1.0)

    def _handle(self, kind: str, pod: Mapping[str, Any]) -> None:
        if kind == "ERROR" or "metadata" not in pod:
            raise RuntimeError(f"watch error: {pod}")
        uid = pod["metadata"]["uid"]
        if kind == "DELETED" or pod["metadata"].get("deletionTimestamp"):
            self._drop(uid)
            return
        if pod_specs.program_of(pod) is None or pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            return
        # A pod may name the runner meant for it (the runner's own tests use a stand-in program).
        if (pod["metadata"].get("annotations") or {}).get(RUNNER_ANNOTATION, "") != self.name:
            return
        with self.lock:
            if uid in self.workers or self.stopping.is_set():
                return
            worker = PodWorker(self, pod)
            self.workers[uid] = worker
        worker.start()

    def _drop(self, uid: str) -> None:
        with self.lock:
            worker = self.workers.pop(uid, None)
        if worker is not None:
            # Stopping can take a grace period; do it off the watch thread.
            threading.Thread(target=worker.stop, name=f"stop-{worker.name}", daemon=True).start()

    def lookup(self, kind: str, namespace: str, name: str) -> Mapping[str, str]:
        """A Secret's or ConfigMap's data, decoded, for env and volumes."""
        if kind == "Secret":
            secret = self.api.read_namespaced_secret(name, namespace)
            return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
        return dict(self.api.read_namespaced_config_map(name, namespace).data or {})


class PodWorker:
    """Runs one pod's process for as long as the pod exists, restarting it as the kubelet would."""

    def __init__(self, runner: PodRunner, pod: Mapping[str, Any]) -> None:
        self.runner = runner
        self.pod = pod
        self.namespace = pod["metadata"]["namespace"]
        self.name = pod["metadata"]["name"]
        self.uid = pod["metadata"]["uid"]
        self.ip = runner.allocate_ip()
        self.dir = runner.workdir / self.namespace / f"{self.name}-{self.uid[:8]}"
        self.log_path = self.dir / "container.log"
        self.stopping = threading.Event()
        self.child: processes.Child | None = None
        self.ready = False
        self.restarts = 0
        self.error: str | None = None
        self.unsent: dict[str, Any] | None = None  # a status the API server has not taken yet
        # The process is forked from this thread, so its parent-death signal lives as long as it.
        self.thread = threading.Thread(target=self._run, name=f"pod-{self.name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=60)

    def kill(self, *, restart: bool) -> None:
        child = self.child
        if child is None or not child.alive():
            raise RuntimeError(f"pod {self.namespace}/{self.name} has no running process to kill")
        if not restart:
            self.stopping.set()
        child.kill()

    def _model_dir(self, model: str) -> str:
        """The local directory of a builtin model, as the trainers make it (for vLLM pods)."""
        done = subprocess.run(
            [str(self.runner.venv_bin / pod_specs.TRAINER), "model-dir", model],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise pod_specs.PodSpecError(f"--model {model}: {done.stderr.strip() or done.returncode}")
        return done.stdout.strip()

    def _prepare(self) -> pod_specs.LocalPlan:
        plan = pod_specs.plan(
            self.pod,
            self.ip,
            self.runner.venv_bin,
            self.dir,
            self.runner.workdir / "claims",
            self.runner.lookup,
            os.environ,
            vllm_python=VLLM_VENV / "bin" / "python",
            resolve_model=self._model_dir,
        )
        for volume in plan.volumes:
            volume.local.mkdir(parents=True, exist_ok=True)
            if volume.source in ("secret", "configMap"):
                kind = "Secret" if volume.source == "secret" else "ConfigMap"
                try:
                    data = self.runner.lookup(kind, self.namespace, volume.source_name)
                except kubernetes.client.ApiException as exc:
                    if exc.status != 404 or not volume.optional:
                        raise
                    data = {}  # optional and missing: an empty volume, as a kubelet mounts it
                paths = {i["key"]: i["path"] for i in volume.items} if volume.items else {k: k for k in data}
                for key, rel in paths.items():
                    if key not in data and volume.optional:
                        continue
                    (volume.local / rel).parent.mkdir(parents=True, exist_ok=True)
                    (volume.local / rel).write_text(data[key])
        if plan.program in (pod_specs.OPERATOR, pod_specs.GATEWAY):
            plan.env["KUBECONFIG"] = str(self._service_account_kubeconfig())
        if plan.program == pod_specs.TRAINER and self.runner.step_holds:
            # Fault tests park this pod's steps at a named phase (lorafleet_trainer.engine.holds); the
            # pod listens on its own loopback address, the only place the trainer accepts holds.
            plan.env["LORAFLEET_TRAINER_TEST_HOLD_DIR"] = str(self.hold_dir)
        return plan

    @property
    def hold_dir(self) -> Path:
        """Where this pod's trainer looks for step holds (see lorafleet_trainer.engine.holds)."""
        return Path(self.dir) / "holds"

    def _service_account_kubeconfig(self) -> Path:
        account = self.pod["spec"].get("serviceAccountName") or "default"
        # Bound to the pod, as a projected token would be: it dies with the pod.
        request = kubernetes.client.AuthenticationV1TokenRequest(
            spec=kubernetes.client.V1TokenRequestSpec(
                audiences=[],
                expiration_seconds=24 * 3600,
                bound_object_ref=kubernetes.client.V1BoundObjectReference(
                    kind="Pod", api_version="v1", name=self.name, uid=self.uid
                ),
            )
        )
        answer = self.runner.api.create_namespaced_service_account_token(account, self.namespace, request)
        if answer.status is None or not answer.status.token:
            raise RuntimeError(
                f"TokenRequest for ServiceAccount {self.namespace}/{account} returned no token"
            )
        token = answer.status.token
        # The CA as a file, like the service-account volume's ca.crt that an in-cluster client reads.
        return kubeconfigs.write(
            self.dir / "serviceaccount.kubeconfig",
            self.runner.endpoint,
            kubeconfigs.token_user(token),
            ca_file=self.dir / "serviceaccount" / "ca.crt",
        )

    def _run(self) -> None:
        while True:
            try:
                plan = self._prepare()
                break
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                # The control plane is down: a kubelet keeps trying to set the pod up.
                print(f"pod-runner: preparing {self.name} again after {exc!r}", file=sys.stderr)
                if self.stopping.wait(1.0):
                    return
            except Exception as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                self._patch_status(phase="Pending", ready=False, message=self.error)
                return
        policy = self.pod["spec"].get("restartPolicy", "Always")
        started = _now()
        while not self.stopping.is_set():
            self.child = processes.Child(self.name, plan.argv, self.log_path, env=plan.env, cwd=self.dir)
            self.ready = False
            self._patch_status(phase="Running", ready=False, started=started)
            while not self.stopping.wait(0.5) and self.child.alive():
                if self.unsent is not None:
                    self._send_status(self.unsent)
                ready = plan.readiness is None or self._probe(*plan.readiness)
                if ready != self.ready:
                    self.ready = ready
                    self._patch_status(phase="Running", ready=ready, started=started)
            if self.stopping.is_set():
                break
            code = self.child.popen.returncode
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                self._patch_status(phase="Succeeded" if code == 0 else "Failed", ready=False, exit_code=code)
                return
            self.restarts += 1
            self._patch_status(phase="Running", ready=False, started=started, exit_code=code)
            self.stopping.wait(min(2.0**self.restarts, 10.0))  # the kubelet's crash-loop backoff, shortened
        grace = min(float(self.pod["spec"].get("terminationGracePeriodSeconds", 30)), 30.0)
        if self.child is not None:
            self.child.stop(grace=grace)

    def _probe(self, path: str, port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.ip}:{port}{path}", timeout=2) as resp:
                return bool(200 <= resp.status < 400)
        except OSError:
            return False

    def _patch_status(
        self,
        phase: str,
        ready: bool,
        started: str | None = None,
        exit_code: int | None = None,
        message: str = "",
    ) -> None:
        now = _now()
        flag = "True" if ready else "False"
        state: dict[str, Any] = {"running": {"startedAt": started or now}} if phase == "Running" else {}
        if phase in ("Succeeded", "Failed"):
            state = {"terminated": {"exitCode": exit_code or 0, "finishedAt": now}}
        container = self.pod["spec"]["containers"][0]
        status: dict[str, Any] = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": started or now,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": flag, "lastTransitionTime": now},
                {"type": "Ready", "status": flag, "lastTransitionTime": now, "message": message},
            ],
            "containerStatuses": [
                {
                    "name": container["name"],
                    "image": container.get("image", ""),
                    "imageID": "",
                    "ready": ready,
                    "started": phase == "Running",
                    "restartCount": self.restarts,
                    "state": state,
                    **(
                        {"lastState": {"terminated": {"exitCode": exit_code}}}
                        if exit_code is not None
                        else {}
                    ),
                }
            ],
        }
        self._send_status(status)

    def _send_status(self, status: dict[str, Any]) -> None:
        """Patch the pod's status; while the API server is unreachable, keep the latest status
        and send it on a later tick, as a kubelet does. The pod's process keeps running."""
        try:
            self.runner.api.patch_namespaced_pod_status(self.name, self.namespace, {"status": status})
        except kubernetes.client.ApiException as exc:
            self.unsent = None if exc.status == 404 else status  # 404: the pod is already gone
        except Exception as exc:  # connection refused or reset: the control plane is down
            self.unsent = status
            print(f"pod-runner: status of {self.name} not sent yet: {exc!r}", file=sys.stderr)
        else:
            self.unsent = None
