"""The chart's RBAC grants what the operator's API calls need, and nothing more.

Every public call of lorafleet_operator.kube.KubeApi (the one module that talks to the Kubernetes
API, through the official client) is made against a recording HTTP server on 127.0.0.1; each
request becomes a (group, resource, verb) triple. With the requests kopf itself makes (its
watches, finalizer patches, Events and discovery), that set must equal what the rendered Roles
and ClusterRole grant, in both scopes.
"""

from __future__ import annotations

import http.server
import inspect
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from kubernetes import client
from tests import json_http
from tests.chart import charting

from lorafleet_operator import kube

Grant = tuple[str, str, str]  # (API group, resource[/subresource], verb)

# What kopf does on its own, beyond KubeApi (see kopf's observation and watching code).
KOPF_NEEDS: set[Grant] = {
    ("lorafleet.io", "trainerpools", "list"),
    ("lorafleet.io", "trainerpools", "watch"),
    ("lorafleet.io", "trainerpools", "patch"),  # finalizer and progress annotations
    ("lorafleet.io", "loraadapters", "list"),
    ("lorafleet.io", "loraadapters", "watch"),
    ("lorafleet.io", "loraadapters", "patch"),
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("", "events", "create"),
    ("events.k8s.io", "events", "create"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
}
# Only when watching named namespaces: kopf follows them being deleted and created again.
KOPF_NAMESPACED_NEEDS: set[Grant] = {("", "namespaces", "list"), ("", "namespaces", "watch")}

POD = {"metadata": {"namespace": "ns", "name": "p-0"}}
LEASE = {"metadata": {"namespace": "ns", "name": "lease", "resourceVersion": "1"}}
CALLS: dict[str, tuple[Any, ...]] = {
    "list_pool_pods": ("ns", "p"),
    "list_pods": ("ns", "app=vllm"),
    "get_pod": ("ns", "p-0"),
    "create_pod": (POD,),
    "delete_pod": ("ns", "p-0"),
    "create_service": (POD,),
    "get_pool": ("ns", "p"),
    "get_adapter": ("ns", "a"),
    "list_pool_adapters": ("ns", "p"),
    "list_adapters": ("ns",),
    "patch_pool_status": ("ns", "p", {"replicas": 1}),
    "patch_adapter_status": ("ns", "a", {"phase": "Ready"}),
    "get_lease": ("ns", "lease"),
    "create_lease": (LEASE,),
    "replace_lease": (LEASE,),
}


class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every request with an empty object and remembers its method and path."""

    seen: ClassVar[list[tuple[str, str]]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        Recorder.seen.append((self.command, self.path.split("?")[0]))
        json_http.answer(self, 200, {"items": []})

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def api_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Recorder.seen = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def as_grant(method: str, path: str) -> Grant:
    """Maps one REST request to the RBAC (group, resource, verb) the API server checks."""
    parts = path.strip("/").split("/")
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    assert rest[0] == "namespaces", path
    resource, tail = rest[2], rest[3:]
    if len(tail) == 2:
        resource = f"{resource}/{tail[1]}"
    verb = {"POST": "create", "DELETE": "delete", "PATCH": "patch", "PUT": "update"}.get(method)
    if verb is None:
        verb = "get" if tail else "list"
    return group, resource, verb


def granted(docs: list[dict[str, Any]]) -> set[Grant]:
    result: set[Grant] = set()
    for doc in docs:
        if doc["kind"] in {"Role", "ClusterRole"}:
            for rule in doc["rules"]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        result |= {(group, resource, verb) for verb in rule["verbs"]}
    return result


async def kube_api_needs(server: str) -> set[Grant]:
    configuration = client.Configuration(host=server, api_key={"BearerToken": "Bearer t"})
    api = kube.KubeApi(configuration)
    try:
        for name, args in CALLS.items():
            await getattr(api, name)(*args)
    finally:
        await api.close()
    return {as_grant(method, path) for method, path in Recorder.seen}


def test_every_kube_api_call_is_exercised() -> None:
    # A new call in KubeApi must be added here, which puts it through the RBAC check below.
    public = {
        name
        for name, member in inspect.getmembers(kube.KubeApi, inspect.iscoroutinefunction)
        if not name.startswith("_") and name != "close"
    }
    assert public == set(CALLS)


@pytest.mark.parametrize("scope", ["namespace", "cluster"])
async def test_rbac_is_exactly_what_the_operator_uses(api_server: str, scope: str) -> None:
    needed = await kube_api_needs(api_server) | KOPF_NEEDS
    if scope == "namespace":
        needed |= KOPF_NAMESPACED_NEEDS
    docs = charting.render(sets=[f"rbac.scope={scope}"])
    # The operator's own Roles: the gateway's account has others (the test below).
    grants = granted(
        [d for kind in ("Role", "ClusterRole") for d in charting.component(docs, kind, "operator")]
    )
    assert not needed - grants, f"missing: {sorted(needed - grants)}"
    assert not grants - needed, f"granted but never used: {sorted(grants - needed)}"


def test_namespace_scope_binds_roles_only_in_watched_namespaces() -> None:
    docs = charting.render(sets=["rbac.namespaces={team-a,team-b}"])
    bindings = charting.kinds(docs, "RoleBinding")
    managed = sorted(
        b["metadata"]["namespace"] for b in bindings if b["roleRef"]["name"] == "lf-lorafleet-operator"
    )
    assert managed == ["lorafleet", "team-a", "team-b"]
    (cluster_role,) = charting.kinds(docs, "ClusterRole")
    # Cluster-wide, the namespace scope may only read CRDs and namespaces.
    assert {r for rule in cluster_role["rules"] for r in rule["resources"]} == {
        "customresourcedefinitions",
        "namespaces",
    }
    (deployment,) = charting.component(docs, "Deployment", "operator")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LORAFLEET_OPERATOR_NAMESPACES"] == "lorafleet,team-a,team-b"


def test_cluster_scope_watches_every_namespace() -> None:
    docs = charting.render(sets=["rbac.scope=cluster"])
    assert not [r for r in charting.kinds(docs, "Role") if r["metadata"]["name"] == "lf-lorafleet-operator"]
    (deployment,) = charting.component(docs, "Deployment", "operator")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LORAFLEET_OPERATOR_NAMESPACES"] == ""


def test_lease_is_granted_only_in_the_release_namespace() -> None:
    docs = charting.render(sets=["rbac.namespaces={team-a}"])
    with_leases = [
        (doc["kind"], doc["metadata"].get("namespace"))
        for doc in docs
        if doc["kind"] in {"Role", "ClusterRole"}
        and any("leases" in rule["resources"] for rule in doc["rules"])
    ]
    assert with_leases == [("Role", "lorafleet")]


@pytest.mark.parametrize("scope", ["namespace", "cluster"])
def test_the_gateway_reads_only_and_gets_secrets_by_name(scope: str) -> None:
    """The gateway lists adapters, pools and server pods, and gets the Secret a pool names for its
    servers' API key (spec.serving.apiKeySecretRef): by name only, never a list or a watch."""
    docs = charting.render(sets=[f"rbac.scope={scope}", "rbac.namespaces={team-a}"])
    roles = [d for kind in ("Role", "ClusterRole") for d in charting.component(docs, kind, "gateway")]
    assert roles
    for role in roles:
        assert granted([role]) == {
            *{
                ("lorafleet.io", r, v)
                for r in ("loraadapters", "trainerpools")
                for v in ("get", "list", "watch")
            },
            *{("", "pods", v) for v in ("get", "list", "watch")},
            ("", "secrets", "get"),
        }
