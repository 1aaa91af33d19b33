"""The operator run outside the cluster, logged in by an ``exec`` credential plugin whose tokens go stale.

As on a laptop against a managed cluster: the kubeconfig's user is an exec plugin
(``lorafleet_local.exec_credentials``: a fresh ServiceAccount token per run from TokenRequest,
announced to expire soon enough that the client renews it every 30 s) and the operator is a local
process, not a pod. It places an adapter and renews its credential on its own; then the test makes
every token issued so far invalid at once (each is bound to a Secret, and the test deletes those
Secrets) and waits until the API server itself refuses them; the operator must log in again
through the plugin to place another adapter and evict on delete. The chart is
installed with no operator replica, so the outside operator acts under the chart's own
ServiceAccount and RBAC.
"""

from __future__ import annotations

import base64
import datetime
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorafleet_local import exec_credentials, processes
from lorafleet_local.fleet import call_trainer, feedback_for
from lorafleet_local.kube import Kube
from lorafleet_local.polling import eventually

pytestmark = pytest.mark.e2e

NS = "lorafleet-exec"
RELEASE = "lorafleet"
CHART = Path(__file__).resolve().parents[2] / "charts" / "lorafleet"
POOL = "outside"
READY_TIMEOUT = "600s"
# The API server keeps a successful token authentication for 10 s (its token cache), so a token
# whose Secret is gone may pass for that long after the deletion.
REFUSAL_TIMEOUT = 60


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
        return exec_credentials.kubeconfig(
            self.workdir / "exec.kubeconfig",
            admin=self.kube.kubeconfig,
            kubectl=self.kube.bin / "kubectl",
            namespace=NS,
            account=account,
            log=self.issued,
        )

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

    def issued_tokens(self) -> list[exec_credentials.Issued]:
        return exec_credentials.read_log(self.issued)

    def revoke(self, issued: list[exec_credentials.Issued]) -> None:
        """Delete the Secrets ``issued`` are bound to: the API server stops accepting those tokens."""
        secrets = sorted({entry.secret for entry in issued})
        self.kube.kubectl("delete", "secret", *secrets, "-n", NS)

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


def test_an_operator_outside_the_cluster_logs_in_again_when_its_exec_tokens_go_stale(
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
    first = outside.issued_tokens()
    assert first, "the operator never ran the exec plugin"

    # Its client renews on its own as an announced expiry nears, while the old token is still
    # good. The operator logs in twice at start (its client, then kopf); a run of the plugin
    # RENEW_AFTER after the first can only be that renewal.
    renew_after = exec_credentials.RENEW_AFTER
    eventually(
        "the operator's client to renew its credential before the announced expiry",
        lambda: any(issued.at - first[0].at >= renew_after for issued in outside.issued_tokens()),
        timeout=renew_after.total_seconds() + 90,
        interval=1.0,
        child=operator,
    )

    # Each token is short-lived by the API server's own clock and announced to the client as
    # expiring sooner still.
    stale = outside.issued_tokens()
    now = datetime.datetime.now(datetime.UTC)
    for issued in stale:
        assert issued.expires - now <= exec_credentials.TOKEN_LIFETIME, f"lives until {issued.expires}"
        assert issued.announced <= issued.expires, issued

    # Every token issued so far goes stale now, at a moment the test picks rather than at an
    # expiry it would have to wait out; wait until the API server itself refuses each of them.
    # From then on, anything the operator does needs a token it fetched again. The client renews
    # on its own every RENEW_AFTER, so one may be issued while the first Secrets are deleted: it is
    # revoked too, until a pass finds nothing new: every token logged before then is stale.
    revoked: list[exec_credentials.Issued] = []
    while len(stale) > len(revoked):
        outside.revoke([issued for issued in stale if issued not in revoked])
        revoked, stale = stale, outside.issued_tokens()
    eventually(
        "the API server to refuse every token issued before the revocation",
        lambda: all(api_status(kube, issued.token) == 401 for issued in stale),
        timeout=REFUSAL_TIMEOUT,
        interval=1.0,
    )
    assert operator.alive(), operator.log_tail()

    kube.apply(adapter_manifest("second"), namespace=NS)
    kube.kubectl(
        "wait", "loraadapter/second", *ns, "--for=condition=Ready", f"--timeout={READY_TIMEOUT}", timeout=700
    )
    fresh = [issued for issued in outside.issued_tokens() if issued not in stale]
    assert fresh, "the operator never ran the plugin again"
    # Refused for being revoked, not because the plugin's tokens stopped working.
    assert api_status(kube, fresh[-1].token) == 200
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
