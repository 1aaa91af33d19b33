"""The local control plane's PKI: who each certificate says it is, and that the CA signed it."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lorafleet_local import pki


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_every_certificate_is_signed_by_the_ca_and_names_its_identity(tmp_path: Path) -> None:
    keys = pki.generate(tmp_path)
    ca = load(keys.ca_cert)
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    serving = load(keys.serving_cert)
    admin = load(keys.admin_cert)
    controller_manager = load(keys.controller_manager_cert)
    for cert in (serving, admin, controller_manager):
        cert.verify_directly_issued_by(ca)

    sans = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert "kubernetes.default.svc" in sans.get_values_for_type(x509.DNSName)
    usage = serving.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]

    # RBAC reads users from CN and groups from O.
    assert admin.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "system:masters"
    cn = controller_manager.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "system:kube-controller-manager"


def test_private_keys_are_readable_by_the_owner_only(tmp_path: Path) -> None:
    keys = pki.generate(tmp_path)
    for path in (keys.serving_key, keys.admin_key, keys.controller_manager_key, keys.service_account_key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
