"""Credentials from a kubeconfig: the ``*-data`` fields hold base64 of PEM, not PEM itself."""

from __future__ import annotations

import base64
import ssl
from pathlib import Path

import kopf
import pytest

from lorafleet_local import pki
from lorafleet_operator import kube


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def test_pem_text_accepts_pem_and_base64_of_pem(tmp_path: Path) -> None:
    keys = pki.generate(tmp_path)
    pem = keys.ca_cert.read_text()
    assert kube.pem_text(pem) == pem
    assert kube.pem_text(_b64(keys.ca_cert)) == pem
    assert kube.pem_text(_b64(keys.ca_cert).encode("ascii")) == pem


def test_pem_text_names_garbage() -> None:
    with pytest.raises(kube.ApiError, match="neither PEM nor base64"):
        kube.pem_text("not a certificate!")


def test_ssl_context_from_embedded_kubeconfig_data(tmp_path: Path) -> None:
    keys = pki.generate(tmp_path)
    info = kopf.ConnectionInfo(
        server="https://127.0.0.1:6443",
        ca_data=_b64(keys.ca_cert),
        certificate_data=_b64(keys.admin_cert),
        private_key_data=_b64(keys.admin_key),
    )
    scratch: list[str] = []
    context = kube._ssl_context(info, scratch)
    request_cleanup = [Path(p) for p in scratch]
    assert isinstance(context, ssl.SSLContext)
    assert context.get_ca_certs(), "the embedded CA was not loaded"
    assert len(scratch) == 2  # client certificate and key spilled to files for ssl
    assert Path(scratch[0]).read_text().startswith("-----BEGIN CERTIFICATE-----")
    for path in request_cleanup:
        path.unlink()
