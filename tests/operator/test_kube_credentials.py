"""Logging in through the official client's loaders, against real HTTP(S) servers on loopback.

A kubeconfig with base64 CA and client-certificate data gets through mutual TLS; an ``exec``
credential plugin's token is renewed when the plugin said it expires; a token the server stops
accepting (401) leads to one fresh login; and a kubeconfig that gives no user is refused by name
instead of sending anonymous requests.
"""

from __future__ import annotations

import http.server
import ssl
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from tests import json_http

from lorafleet_local import kubeconfigs, pki
from lorafleet_operator import credentials, kube

POOL = {"apiVersion": "lorafleet.io/v1alpha1", "kind": "TrainerPool", "metadata": {"name": "p"}}


class Api(http.server.BaseHTTPRequestHandler):
    """Answers GETs with a TrainerPool, or 401 to a token in ``refused``; records who asked."""

    seen: ClassVar[list[str]] = []
    refused: ClassVar[set[str]] = set()

    def do_GET(self) -> None:
        who = self.headers.get("Authorization") or ""
        if isinstance(self.connection, ssl.SSLSocket):
            subject = dict(item[0] for item in (self.connection.getpeercert() or {}).get("subject", ()))
            who = f"cert:{subject.get('commonName')}"
        Api.seen.append(who)
        code, body = (401, {"kind": "Status", "code": 401}) if who in Api.refused else (200, POOL)
        json_http.answer(self, code, body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _serve(server: http.server.ThreadingHTTPServer) -> Iterator[str]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Api.seen, Api.refused = [], set()
    try:
        scheme = "https" if isinstance(server.socket, ssl.SSLSocket) else "http"
        yield f"{scheme}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def api_server() -> Iterator[str]:
    yield from _serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api))


@pytest.fixture(autouse=True)
def outside_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def exec_kubeconfig(tmp_path: Path, server: str, *, expires: bool) -> Path:
    """A kubeconfig whose user is an exec plugin printing token-1, token-2, ... (one per run)."""
    plugin = tmp_path / "plugin.py"
    expiry = (
        "import datetime; status['expirationTimestamp'] = (datetime.datetime.now(datetime.UTC)"
        " + datetime.timedelta(minutes=1)).strftime('%Y-%m-%dT%H:%M:%SZ')"
        if expires
        else ""
    )
    plugin.write_text(
        f"#!{sys.executable}\n"
        "import json, pathlib\n"
        f"count = pathlib.Path({str(tmp_path / 'runs')!r})\n"
        "runs = int(count.read_text()) + 1 if count.exists() else 1\n"
        "count.write_text(str(runs))\n"
        "status = {'token': f'token-{runs}'}\n"
        f"{expiry}\n"
        "print(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1', 'kind': 'ExecCredential',"
        " 'status': status}))\n"
    )
    plugin.chmod(0o755)
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": str(plugin)}}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "c",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


async def test_client_certificates_from_base64_kubeconfig_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = pki.generate(tmp_path / "pki")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(keys.ca_cert))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(str(keys.serving_cert), str(keys.serving_key))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    for url in _serve(server):
        path = tmp_path / "kubeconfig"
        user = kubeconfigs.client_cert_user(keys.admin_cert, keys.admin_key)
        kubeconfigs.write(path, kubeconfigs.Endpoint(url, keys.ca_cert.read_bytes()), user)
        monkeypatch.setenv("KUBECONFIG", str(path))
        api = kube.KubeApi(credentials.load())
        try:
            assert await api.get_pool("ns", "p") == POOL
        finally:
            await api.close()
        assert Api.seen and Api.seen[0].startswith("cert:")
        info = credentials.connection_info(credentials.load())
        assert (
            info.certificate_path and Path(info.certificate_path).read_bytes() == keys.admin_cert.read_bytes()
        )


async def test_an_exec_token_is_renewed_when_the_plugin_says_it_expires(
    tmp_path: Path, api_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The plugin says its token expires in a minute: inside the client's margin, so every request
    # runs the plugin again, as one would once a real token's time is up.
    monkeypatch.setenv("KUBECONFIG", str(exec_kubeconfig(tmp_path, api_server, expires=True)))
    api = kube.KubeApi(credentials.load())
    try:
        await api.get_pool("ns", "p")
        await api.get_pool("ns", "p")
    finally:
        await api.close()
    assert len(set(Api.seen)) == 2 and all(seen.startswith("Bearer token-") for seen in Api.seen)


async def test_a_refused_token_leads_to_one_fresh_login(
    tmp_path: Path, api_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(exec_kubeconfig(tmp_path, api_server, expires=False)))
    Api.refused = {"Bearer token-1"}  # revoked, or expired without the plugin saying when
    api = kube.KubeApi(credentials.load(), relogin=credentials.load)
    try:
        assert await api.get_pool("ns", "p") == POOL
        assert await api.get_pool("ns", "p") == POOL
    finally:
        await api.close()
    assert Api.seen == ["Bearer token-1", "Bearer token-2", "Bearer token-2"]


async def test_without_relogin_a_401_is_an_api_error(
    tmp_path: Path, api_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(exec_kubeconfig(tmp_path, api_server, expires=False)))
    Api.refused = {"Bearer token-1"}
    api = kube.KubeApi(credentials.load())
    try:
        with pytest.raises(kube.ApiError) as caught:
            await api.get_pool("ns", "p")
    finally:
        await api.close()
    assert caught.value.status == 401 and "ns/p" in caught.value.message


def test_kopf_logs_in_as_the_same_user(
    tmp_path: Path, api_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(exec_kubeconfig(tmp_path, api_server, expires=False)))
    info = credentials.kopf_login()
    assert (info.server, info.scheme, info.token) == (api_server, "Bearer", "token-1")


def test_a_missing_kubeconfig_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    with pytest.raises(credentials.NoCredentials, match="absent"):
        credentials.load()


def test_a_failing_exec_plugin_is_refused_not_anonymous(
    tmp_path: Path, api_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = exec_kubeconfig(tmp_path, api_server, expires=False)
    (tmp_path / "plugin.py").write_text("#!/bin/sh\necho 'no credentials for you' >&2\nexit 1\n")
    monkeypatch.setenv("KUBECONFIG", str(path))
    with pytest.raises(credentials.NoCredentials, match="gave no credentials"):
        credentials.load()
