"""The operator run outside the cluster, logged in by an ``exec`` credential plugin whose tokens expire.

As on a laptop against a managed cluster: the kubeconfig's user is an exec plugin (here a script
that asks the API server for a short-lived token of the chart's ServiceAccount with ``kubectl create
token``) and the operator is a local process, not a pod. It places an adapter, places another after
its first token has expired (the test waits until the API server refuses that token), and evicts on
delete. The chart is installed with no operator replica, so the outside operator acts under the
chart's own ServiceAccount and RBAC.
"""

from __future__ import annotations

import base64
import datetime
import json
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorafleet_local import processes
from lorafleet_local.fleet import call_trainer, feedback_for
from lorafleet_local.kube import Kube
from lorafleet_local.polling import eventually

pytestmark = pytest.mark.e2e

NS = "lorafleet-exec"
RELEASE = "lorafleet"
CHART = Path(__file__).resolve().parents[2] / "charts" / "lorafleet"
POOL = "outside"
# TokenRequest's shortest lifetime: the API server refuses expirationSeconds under 600.
TOKEN_MINUTES = 10
READY_TIMEOUT = "600s"

PLUGIN = """#!{python}
# An exec credential plugin: a fresh token of the ServiceAccount per run, logged for the test.
import json, subprocess, sys
answer = json.loads(subprocess.run(
    [{kubectl!r}, "--kubeconfig", {admin!r}, "create", "token", {account!r}, "-n", {ns!r},
     "--duration", "{minutes}m", "-o", "json"],
    check=True, capture_output=True, text=True).stdout)
status = answer["status"]
with open({log!r}, "a") as log:
    log.write(json.dumps(status) + "\\n")
credential = {{"token": status["token"], "expirationTimestamp": status["expirationTimestamp"]}}
print(json.dumps({{"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                  "status": credential}}))
"""


def pool_manifest() -> str:
    pool = {
        "apiVersion": "lorafleet.io/v1alpha1",
        "kind": "TrainerPool",
        "metadata": {"name": POOL},
        # Ephemeral by choice: this test is about logging in, not about keeping weights.
        "spec": {
            "baseModel": "builtin:tiny",
            "replicas": 1,
            "gpu": False,
            "cache": {"capacity": "256Mi"},
            "storage": {"ephemeral": True},
        },
    }
    return yaml.safe_dump(pool)


def adapter_manifest(name: str) -> str:
    adapter = {
        "apiVersion": "lorafleet.io/v1alpha1",
        "kind": "LoraAdapter",
        "metadata": {"name": name},
        "spec": {"pool": POOL, "lora": {"rank": 4, "alpha": 8, "targetModules": ["q_proj"]}},
    }
    return yaml.safe_dump(adapter)


class Outside:
    """The chart without its operator pod, and the operator as a local process with an exec login."""

    def __init__(self, kube: Kube, workdir: Path) -> None:
        self.kube, self.workdir = kube, workdir
        self.issued = workdir / "issued.jsonl"
        self.operator: processes.Child | None = None

    def install(self) -> None:
        # The cluster's own values too: on a real node, the trainer image that `make images` built.
        sets = [arg for value in ("operator.replicas=0", *self.kube.helm_values) for arg in ("--set", value)]
        self.kube.helm(
            "install", RELEASE, str(CHART), "--namespace", NS, "--create-namespace", *sets,
            "--wait", "--timeout", "5m", timeout=400,
        )  # fmt: skip

    def kubeconfig(self) -> Path:
        """A kubeconfig for the API server whose user is the exec plugin."""
        deployment = self.kube.get("deployment", "-n", NS, "-l", "app.kubernetes.io/component=operator")
        (operator,) = deployment["items"]
        account = operator["spec"]["template"]["spec"]["serviceAccountName"]
        plugin = self.workdir / "token-plugin.py"
        plugin.write_text(
            PLUGIN.format(
                python=sys.executable,
                kubectl=str(self.kube.bin / "kubectl"),
                admin=str(self.kube.kubeconfig),
                account=account,
                ns=NS,
                minutes=TOKEN_MINUTES,
                log=str(self.issued),
            )
        )
        plugin.chmod(0o755)
        admin = yaml.safe_load(self.kube.kubeconfig.read_text())
        cluster = admin["clusters"][0]["cluster"]
        user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": str(plugin)}}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "local", "cluster": cluster}],
            "users": [{"name": "plugin", "user": user}],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": "plugin"}}],
            "current-context": "local",
        }
        path = self.workdir / "exec.kubeconfig"
        path.write_text(yaml.safe_dump(config))
        return path

    def start_operator(self) -> processes.Child:
        """The operator with the settings the chart's Deployment gives it, but run here."""
        (deployment,) = self.kube.get("deployment", "-n", NS, "-l", "app.kubernetes.io/component=operator")[
            "items"
        ]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        token_file = self.workdir / "trainer-token"
        secret_volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if "secret" in v)
        secret = self.kube.get("secret", secret_volume["secret"]["secretName"], "-n", NS)
        key = env["LORAFLEET_OPERATOR_AUTH_TOKEN_FILE"].rsplit("/", 1)[1]
        token_file.write_bytes(base64.b64decode(secret["data"][key]))
        env |= {
            "LORAFLEET_OPERATOR_AUTH_TOKEN_FILE": str(token_file),
            "LORAFLEET_OPERATOR_LEASE_NAMESPACE": NS,
            "LORAFLEET_OPERATOR_METRICS_HOST": "127.0.0.1",
            "LORAFLEET_OPERATOR_METRICS_PORT": str(processes.free_port()),
            "KUBECONFIG": str(self.kubeconfig()),
        }
        self.operator = processes.Child(
            "operator-outside",
            [sys.executable, "-m", "lorafleet_operator.cli"],
            self.workdir / "operator.log",
            env={**self.kube.env(), **env},
        )
        return self.operator

    def issued_tokens(self) -> list[dict[str, Any]]:
        if not self.issued.exists():
            return []
        return [json.loads(line) for line in self.issued.read_text().splitlines() if line.strip()]

    def uninstall(self) -> None:
        self.kube.kubectl(
            "delete", "loraadapters,trainerpools", "--all", "-n", NS, "--wait=false", check=False
        )
        try:
            eventually(
                "the custom resources to go",
                lambda: not self.kube.get("loraadapters,trainerpools", "-n", NS)["items"],
                timeout=120,
                interval=1.0,
            )
        finally:
            if self.operator is not None:
                self.operator.stop()
            self.kube.helm(
                "uninstall", RELEASE, "-n", NS, "--wait", "--timeout", "90s", check=False, timeout=120
            )
            self.kube.kubectl("delete", "namespace", NS, "--wait=false", check=False)


def expiry(issued: dict[str, Any]) -> datetime.datetime:
    return datetime.datetime.fromisoformat(str(issued["expirationTimestamp"]).replace("Z", "+00:00"))


def api_status(kube: Kube, token: str) -> int:
    """The API server's answer to a request made with ``token`` (200 while it is valid, then 401)."""
    assert kube.plane is not None and kube.plane.pki is not None
    context = ssl.create_default_context(cafile=str(kube.plane.pki.ca_cert))
    request = urllib.request.Request(
        f"{kube.plane.server}/apis", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code


class Trainer:
    """The trainer API of the pool's pods, called with the trainers' bearer token."""

    def __init__(self, kube: Kube, token: str) -> None:
        self.kube, self.token = kube, token

    def call(self, method: str, url: str, body: Any = None) -> tuple[int, Any]:
        return call_trainer(method, url, body, self.token, timeout=300)

    def adapter_url(self, name: str, status: dict[str, Any]) -> str:
        route = f"/v1/adapters/{NS}/{name}"
        endpoint = str(status["endpoint"]).rstrip("/")
        return endpoint if endpoint.endswith(route) else endpoint + route

    def cached(self, pod: str) -> set[str]:
        """The adapters in a pod's cache (GET /v1/cache)."""
        code, cache = self.call("GET", self.kube.reach(NS, pod, 8080) + "/v1/cache")
        assert code == 200, cache
        return {str(entry["adapter"]) for entry in cache["entries"]}


@pytest.fixture(scope="module")
def outside(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outside]:
    if not kube.local:
        pytest.skip("an operator outside the cluster reaches trainer pods only on the local control plane")
    setup = Outside(kube, tmp_path_factory.mktemp("outside"))
    setup.install()
    try:
        yield setup
    finally:
        setup.uninstall()


def test_an_operator_outside_the_cluster_logs_in_with_an_exec_plugin_past_token_expiry(
    outside: Outside,
) -> None:
    kube = outside.kube
    operator = outside.start_operator()
    ns = ("-n", NS)
    kube.apply(pool_manifest(), namespace=NS)
    kube.apply(adapter_manifest("first"), namespace=NS)
    kube.kubectl(
        "wait", "loraadapter/first", *ns, "--for=condition=Ready", f"--timeout={READY_TIMEOUT}", timeout=700
    )

    # The operator (its own client and kopf) acts through tokens only the plugin handed out.
    initial = outside.issued_tokens()
    assert initial, "the operator never ran the exec plugin"
    expiries = [expiry(issued) for issued in initial]
    lifetime = max(expiries) - datetime.datetime.now(datetime.UTC)
    assert lifetime <= datetime.timedelta(minutes=TOKEN_MINUTES), f"a token lives {lifetime}"

    # Wait until the API server itself refuses every token issued so far: their expiry, not a
    # guess at it. From then on, anything the operator does needs a token it fetched again.
    eventually(
        "the API server to refuse every token issued so far",
        lambda: all(api_status(kube, issued["token"]) == 401 for issued in initial),
        timeout=lifetime.total_seconds() + 120,
        interval=5,
    )
    assert operator.alive(), operator.log_tail()

    kube.apply(adapter_manifest("second"), namespace=NS)
    kube.kubectl(
        "wait", "loraadapter/second", *ns, "--for=condition=Ready", f"--timeout={READY_TIMEOUT}", timeout=700
    )
    assert len(outside.issued_tokens()) > len(initial), "the operator never ran the plugin again"
    assert operator.alive(), operator.log_tail()  # it kept its Lease throughout

    # Eviction on delete: one training step puts "first" in its pod's cache; the finalizer empties
    # that entry before the object goes.
    trainer = Trainer(kube, (outside.workdir / "trainer-token").read_text().strip())
    status = kube.get("loraadapter", "first", *ns)["status"]
    code, step = trainer.call(
        "POST", trainer.adapter_url("first", status) + "/distill", feedback_for("first")
    )
    assert code == 200, step
    assert f"{NS}/first" in trainer.cached(status["pod"])
    kube.kubectl("delete", "loraadapter", "first", *ns, "--timeout=120s")
    assert f"{NS}/first" not in trainer.cached(status["pod"])
    assert kube.get("loraadapter", "second", *ns)["status"]["phase"] == "Ready"
    # kopf posts Events from a queue of its own, so the Event may land just after the object went.
    eventually(
        "the Evicted Event on first",
        lambda: (
            "Evicted"
            in kube.kubectl("get", "events", *ns, "--field-selector", "involvedObject.name=first").stdout
        ),
        timeout=60,
    )
