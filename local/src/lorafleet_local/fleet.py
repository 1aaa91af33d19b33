"""An installed LoraFleet release, seen from outside the cluster as a user sees it.

Shared by the demo and the e2e tests: install the chart with Helm, find the trainers'
bearer token behind the operator's token file, reach an adapter's trainer route from its
`status.endpoint`, keep a real Prometheus scraping the trainer pods, and read figures back.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorafleet_local import checkout, processes
from lorafleet_local.kube import Kube
from lorafleet_local.polling import eventually
from lorafleet_local.prometheus import Prometheus

CHART = checkout.CHART
EXAMPLES = checkout.EXAMPLES
RELEASE = "lorafleet"
POOL = "demo"
TRAINER_PORT = 8080
HELM_SET_ENV = "LORAFLEET_E2E_HELM_SET"  # comma-separated `--set` values added to every install


def pool_manifest(model: str) -> str:
    """examples/pool.yaml (its claim and the `demo` pool), the pool's baseModel set to ``model``.

    The example serves the real instruct model; the e2e and fault tests give it builtin:tiny.
    """
    documents = list(yaml.safe_load_all((EXAMPLES / "pool.yaml").read_text()))
    (pool,) = [d for d in documents if d["kind"] == "TrainerPool"]
    pool["spec"]["baseModel"] = model
    return yaml.safe_dump_all(documents)


def call_trainer(
    method: str, url: str, body: Any = None, token: str = "", timeout: float = 120.0
) -> tuple[int, Any]:
    """One trainer API call, JSON in and out, with a bearer token if given; (status code, decoded JSON).

    An error status is an answer like any other (its JSON body names what was wrong), not an exception.
    """
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read() or b"null")


def feedback_for(name: str) -> dict[str, Any]:
    """The example feedback for an adapter (examples/feedback/<name>-1.json, else alice's)."""
    path = EXAMPLES / "feedback" / f"{name}-1.json"
    if not path.exists():
        path = EXAMPLES / "feedback" / "alice-1.json"
    return dict(json.loads(path.read_text()))


@dataclass
class Fleet:
    kube: Kube
    namespace: str
    prometheus: Prometheus
    metrics_port: int
    token: str = ""
    operator_pod: str = ""
    targets: int = 0  # trainer pods Prometheus was last pointed at
    figures: dict[str, float] = field(default_factory=dict)

    @classmethod
    def install(cls, kube: Kube, namespace: str, workdir: Path, *extra_values: str) -> Fleet:
        """`helm install` the chart and start Prometheus; the operator's port is free on this host."""
        # Locally every pod shares the host's ports, so the operator gets a free one; kind keeps the default.
        metrics_port = processes.free_port() if kube.pods_on_loopback else 8000
        # The kind workflow names its locally built images here (scripts/e2e-kind.sh).
        from_env = [v for v in os.environ.get(HELM_SET_ENV, "").split(",") if v.strip()]
        values = [f"operator.metricsPort={metrics_port}", *kube.helm_values, *from_env, *extra_values]
        sets = [arg for value in values for arg in ("--set", value)]
        kube.helm(
            "install", RELEASE, str(CHART), "--namespace", namespace, "--create-namespace", *sets,
            "--wait", "--timeout", "5m", timeout=400,
        )  # fmt: skip
        prometheus = Prometheus(workdir / "prometheus").start()
        fleet = cls(kube, namespace, prometheus, metrics_port)
        try:
            fleet.operator_pod = fleet.operator()["metadata"]["name"]
            fleet.token = fleet.read_token()
        except BaseException:
            prometheus.stop()
            raise
        return fleet

    def operator(self) -> dict[str, Any]:
        pods = self.kube.get("pods", "-n", self.namespace, "-l", "app.kubernetes.io/component=operator")[
            "items"
        ]
        if len(pods) != 1:
            raise AssertionError(f"expected one operator pod, found {[p['metadata']['name'] for p in pods]}")
        return dict(pods[0])

    def read_token(self) -> str:
        """The trainers' bearer token: the Secret key behind the operator's token file."""
        pod = self.operator()
        container = pod["spec"]["containers"][0]
        token_file = next(
            e["value"] for e in container["env"] if e["name"] == "LORAFLEET_OPERATOR_AUTH_TOKEN_FILE"
        )
        mount = next(
            m for m in container["volumeMounts"] if token_file.startswith(m["mountPath"].rstrip("/") + "/")
        )
        volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
        secret = self.kube.get("secret", volume["secret"]["secretName"], "-n", self.namespace)
        return base64.b64decode(secret["data"][token_file.rsplit("/", 1)[1]]).decode()

    def uninstall(self, timeout: float = 90) -> None:
        """Delete the example vLLM Deployment and the custom resources (the operator still runs to
        release their finalizers), then `helm uninstall`. Bounded: a broken operator must not hang
        a teardown. Prints how long each part took: a slow teardown is test time too."""
        self.prometheus.stop()
        ns = ("-n", self.namespace)
        started = time.monotonic()
        # The example vLLM Deployment, if it was applied: it must not keep serving after the release.
        self.kube.kubectl(
            "delete",
            "-f",
            str(EXAMPLES / "vllm.yaml"),
            *ns,
            "--ignore-not-found",
            "--wait=false",
            check=False,
        )
        self.kube.kubectl("delete", "loraadapters,trainerpools", "--all", *ns, "--wait=false", check=False)
        try:
            eventually(
                "the custom resources to go",
                lambda: not self.kube.get("loraadapters,trainerpools", *ns)["items"],
                timeout=timeout,
                interval=1.0,
            )
        except TimeoutError as exc:
            print(f"teardown: {exc}", file=sys.stderr)
        resources_s = time.monotonic() - started
        self.kube.helm(
            "uninstall",
            RELEASE,
            *ns,
            "--wait",
            "--timeout",
            f"{int(timeout)}s",
            check=False,
            timeout=timeout + 30,
        )
        print(
            f"teardown of {self.namespace}: custom resources gone in {resources_s:.1f} s, "
            f"helm uninstall {time.monotonic() - started - resources_s:.1f} s",
            file=sys.stderr,
        )

    def adapter(self, name: str) -> dict[str, Any]:
        return dict(self.kube.get("loraadapter", name, "-n", self.namespace))

    def trainer_url(self, pod: str) -> str:
        return self.kube.reach(self.namespace, pod, TRAINER_PORT)

    def call(self, method: str, url: str, body: Any = None) -> tuple[int, Any]:
        """One trainer API call with the trainers' bearer token; (status code, decoded JSON)."""
        return call_trainer(method, url, body, self.token)

    def adapter_url(self, name: str, status: dict[str, Any] | None = None) -> str:
        """The adapter's trainer route, from its status.endpoint (read now unless ``status`` is
        given), reachable from this process."""
        status = status if status is not None else self.adapter(name)["status"]
        endpoint = urllib.parse.urlsplit(status["endpoint"])
        base = self.trainer_url(status["pod"])
        if self.kube.pods_on_loopback and base != f"{endpoint.scheme}://{endpoint.netloc}":
            # Locally this process reaches the very address the operator published.
            raise AssertionError(f"status.endpoint {status['endpoint']} is not pod {status['pod']} at {base}")
        path = endpoint.path.rstrip("/")
        route = f"/v1/adapters/{self.namespace}/{name}"
        return str(base + (path if path.endswith(route) else path + route))

    def cached(self, pod: str) -> set[str]:
        """Names of the adapter cache entries on a trainer pod (GET /v1/cache)."""
        code, cache = self.call("GET", self.trainer_url(pod) + "/v1/cache")
        if code != 200:
            raise AssertionError(f"GET /v1/cache on {pod}: {code} {cache}")
        return {str(entry["adapter"]) for entry in cache["entries"]}

    def refresh_targets(self) -> None:
        """Point Prometheus at the pool's pods as they are now."""
        pods = self.kube.get("pods", "-n", self.namespace, "-l", f"lorafleet.io/pool={POOL}")["items"]
        targets = {}
        for pod in pods:
            if pod["status"].get("podIP") and not pod["metadata"].get("deletionTimestamp"):
                address = urllib.parse.urlsplit(self.trainer_url(pod["metadata"]["name"])).netloc
                targets[address] = {"namespace": self.namespace, "pod": pod["metadata"]["name"]}
        self.prometheus.set_targets(targets)
        self.targets = len(targets)

    def scraped(self, promql: str, since: float) -> float:
        """A PromQL value from scrapes of every trainer that all happened after `since` (unix time)."""
        # Prometheus picks up file_sd changes asynchronously: a target it has not discovered yet would
        # be missing from both the freshness check and the sum, so count the fresh targets too.
        up = 'up{job="lorafleet-trainers"}'
        fresh = f"count(timestamp({up}) > {since}) == {self.targets}"
        eventually(
            f"a scrape of all {self.targets} trainers after {since:.0f}",
            lambda: self.prometheus.query(fresh),
            timeout=60,
        )
        value = self.prometheus.value(promql)
        return 0.0 if value is None else value

    def hit_ratio(self) -> float | None:
        hits = "sum(lorafleet_trainer_cache_hits_total)"
        return self.prometheus.value(f"{hits} / ({hits} + sum(lorafleet_trainer_cache_misses_total))")
