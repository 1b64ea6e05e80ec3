"""Lab PKI helpers: the CA and the certificates it issues carry the right extensions."""

from __future__ import annotations

import ipaddress
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from wpk_upgrade import pki
from wpk_upgrade.errors import WpkUpgradeError


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> pki.CaFiles:
    return pki.create_ca(tmp_path_factory.mktemp("ca"))


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _ext(cert: x509.Certificate, cls: type) -> x509.ExtensionType:
    return cert.extensions.get_extension_for_class(cls).value


def test_create_ca_writes_self_signed_ca(ca: pki.CaFiles) -> None:
    assert ca.cert.name == "ca.pem" and ca.key.name == "ca.key"
    assert stat.S_IMODE(ca.key.stat().st_mode) == 0o600
    cert = _cert(ca.cert)
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "wpk-upgrade lab CA"
    )
    cert.verify_directly_issued_by(cert)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = _ext(cert, x509.KeyUsage)
    assert ku.key_cert_sign and ku.crl_sign
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=3649) < life < timedelta(days=3651)
    key = pki.load_private_key(ca.key)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048


def test_create_ca_refuses_to_overwrite(tmp_path: Path) -> None:
    first = pki.create_ca(tmp_path, common_name="one", key_size=1024)
    with pytest.raises(WpkUpgradeError, match="already exists"):
        pki.create_ca(tmp_path, common_name="two", key_size=1024)
    assert "one" in _cert(first.cert).subject.rfc4514_string()
    pki.create_ca(tmp_path, common_name="two", key_size=1024, overwrite=True)
    assert "two" in _cert(first.cert).subject.rfc4514_string()


@pytest.mark.parametrize(
    ("usage", "oid"),
    [
        ("code", ExtendedKeyUsageOID.CODE_SIGNING),
        ("server", ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH),
    ],
)
def test_issue_leaf_usages(ca: pki.CaFiles, tmp_path: Path, usage: str, oid: object) -> None:
    files = pki.issue_certificate(ca.cert, ca.key, tmp_path, f"my {usage}", usage)  # type: ignore[arg-type]
    assert files.cert.name == f"my_{usage}.pem" and files.key.name == f"my_{usage}.key"
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    cert, ca_cert = _cert(files.cert), _cert(ca.cert)
    cert.verify_directly_issued_by(ca_cert)
    assert list(_ext(cert, x509.ExtendedKeyUsage)) == [oid]
    assert not _ext(cert, x509.BasicConstraints).ca
    ku = _ext(cert, x509.KeyUsage)
    assert ku.digital_signature and not ku.key_cert_sign
    aki = _ext(cert, x509.AuthorityKeyIdentifier)
    assert aki.key_identifier == _ext(ca_cert, x509.SubjectKeyIdentifier).digest
    key = pki.load_private_key(files.key)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_issue_server_sans(ca: pki.CaFiles, tmp_path: Path) -> None:
    files = pki.issue_certificate(
        ca.cert, ca.key, tmp_path, "manager", "server", san=["manager.lab", "10.0.0.5", "::1"]
    )
    san = _ext(_cert(files.cert), x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["manager.lab"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
    ]
    default = pki.issue_certificate(ca.cert, ca.key, tmp_path, "node1.lab", "server")
    san = _ext(_cert(default.cert), x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["node1.lab"]
    client = pki.issue_certificate(ca.cert, ca.key, tmp_path, "agent-7", "client")
    with pytest.raises(x509.ExtensionNotFound):
        _cert(client.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_intermediate_ca_issues_leaves(ca: pki.CaFiles, tmp_path: Path) -> None:
    inter = pki.issue_certificate(ca.cert, ca.key, tmp_path, "intermediate", "ca")
    inter_cert = _cert(inter.cert)
    assert _ext(inter_cert, x509.BasicConstraints).ca
    assert _ext(inter_cert, x509.KeyUsage).key_cert_sign
    leaf = pki.issue_certificate(inter.cert, inter.key, tmp_path, "leaf", "code")
    leaf_cert = _cert(leaf.cert)
    leaf_cert.verify_directly_issued_by(inter_cert)
    assert leaf_cert.issuer == inter_cert.subject


def test_key_types_sizes_and_dates(ca: pki.CaFiles, tmp_path: Path) -> None:
    big = pki.issue_certificate(ca.cert, ca.key, tmp_path, "big", "code", key_size=3072)
    assert _cert(big.cert).public_key().key_size == 3072  # type: ignore[union-attr]
    ecc = pki.issue_certificate(ca.cert, ca.key, tmp_path, "ecc", "code", key_type="ec")
    assert isinstance(_cert(ecc.cert).public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(pki.load_private_key(ecc.key), ec.EllipticCurvePrivateKey)
    start = datetime(2020, 1, 1, tzinfo=UTC)
    old = pki.issue_certificate(
        ca.cert,
        ca.key,
        tmp_path,
        "old",
        "code",
        not_before=start,
        not_after=start + timedelta(days=1),
        basename="expired-signer",
    )
    assert old.cert.name == "expired-signer.pem"
    cert = _cert(old.cert)
    assert cert.not_valid_before_utc == start
    assert cert.not_valid_after_utc == start + timedelta(days=1)
    short = pki.issue_certificate(ca.cert, ca.key, tmp_path, "short", "code", days=10)
    life = _cert(short.cert).not_valid_after_utc - _cert(short.cert).not_valid_before_utc
    assert life == timedelta(days=10)


def test_issue_refusals(ca: pki.CaFiles, tmp_path: Path) -> None:
    other = pki.create_ca(tmp_path / "other", key_size=1024)
    with pytest.raises(WpkUpgradeError, match="does not match"):
        pki.issue_certificate(ca.cert, other.key, tmp_path, "x", "code")
    with pytest.raises(WpkUpgradeError, match="unknown usage"):
        pki.issue_certificate(ca.cert, ca.key, tmp_path, "x", "email")  # type: ignore[arg-type]
    now = datetime.now(UTC)
    with pytest.raises(WpkUpgradeError, match="validity is empty"):
        pki.issue_certificate(ca.cert, ca.key, tmp_path, "x", "code", not_before=now, not_after=now)
    with pytest.raises(WpkUpgradeError, match="cannot load certificate"):
        pki.issue_certificate(tmp_path / "missing.pem", ca.key, tmp_path, "x", "code")
    pki.issue_certificate(ca.cert, ca.key, tmp_path, "same", "code", key_size=1024)
    with pytest.raises(WpkUpgradeError, match="already exists"):
        pki.issue_certificate(ca.cert, ca.key, tmp_path, "same", "code", key_size=1024)
    assert not list(tmp_path.glob(".*tmp*"))
