"""A small lab PKI: a self-signed CA and the certificates it issues, for tests, demos and
operators who have no PKI of their own.

* ``create_ca`` writes ``ca.pem`` and ``ca.key`` (mode 0600) into a directory.
* ``issue_certificate`` issues a leaf for code signing (WPK signers), TLS servers or TLS clients,
  or an intermediate CA (``usage="ca"``), with the matching KeyUsage / ExtendedKeyUsage and
  subjectAltName entries (DNS names or IP addresses).
* Keys are RSA by default (any size); ``key_type="ec"`` makes a P-256 key, which the WPK format
  cannot use (the tamper tests need exactly such a signer).

Only ``cryptography`` is used. Private keys are written unencrypted (PKCS#8 PEM) with mode 0600,
and existing files are never overwritten unless ``overwrite=True``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from wpk_upgrade.errors import WpkUpgradeError

__all__ = [
    "CaFiles",
    "CertFiles",
    "KeyType",
    "Usage",
    "create_ca",
    "generate_key",
    "issue_certificate",
    "load_certificate",
    "load_private_key",
]

Usage = Literal["code", "server", "client", "ca"]
KeyType = Literal["rsa", "ec"]

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

#: Issued certificates start this much in the past, so small clock skews do not bite.
CLOCK_SKEW = timedelta(minutes=5)


@dataclass(frozen=True)
class CaFiles:
    """Where a lab CA was written."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class CertFiles:
    """Where an issued certificate and its private key were written."""

    cert: Path
    key: Path


def generate_key(key_type: KeyType = "rsa", key_size: int = 2048) -> PrivateKey:
    """A fresh private key: RSA of ``key_size`` bits, or EC P-256 (``key_size`` ignored)."""
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    raise WpkUpgradeError(f"unknown key type {key_type!r} (expected 'rsa' or 'ec')")


def load_certificate(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file."""
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise WpkUpgradeError(f"cannot load certificate {path}: {exc}") from exc


def load_private_key(path: Path, password: bytes | None = None) -> PrivateKey:
    """An RSA or EC private key from a PEM file."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=password)
    except (OSError, ValueError, TypeError) as exc:
        raise WpkUpgradeError(f"cannot load private key {path}: {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise WpkUpgradeError(f"private key {path} is neither RSA nor EC")
    return key


def create_ca(
    dir: Path,
    common_name: str = "wpk-upgrade lab CA",
    days: int = 3650,
    key_size: int = 2048,
    *,
    key_type: KeyType = "rsa",
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    overwrite: bool = False,
) -> CaFiles:
    """Create a self-signed CA in ``dir`` (created if missing): ``ca.pem`` and ``ca.key``."""
    directory = Path(dir)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    _refuse_existing((cert_path, key_path), overwrite)
    key = generate_key(key_type, key_size)
    start, end = _validity(days, not_before, not_after)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return CaFiles(cert=cert_path, key=key_path)


def issue_certificate(
    ca_cert: Path,
    ca_key: Path,
    out_dir: Path,
    common_name: str,
    usage: Usage,
    *,
    san: Sequence[str] = (),
    days: int = 825,
    key_size: int = 2048,
    key_type: KeyType = "rsa",
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    basename: str | None = None,
    overwrite: bool = False,
) -> CertFiles:
    """Issue a certificate signed by the CA at ``ca_cert``/``ca_key``.

    ``usage`` chooses the extensions: ``code`` (digitalSignature, EKU codeSigning: a WPK
    signer), ``server`` (EKU serverAuth; the common name becomes a DNS SAN when ``san`` is
    empty), ``client`` (EKU clientAuth) or ``ca`` (an intermediate CA, no EKU). ``san`` entries
    that parse as IP addresses become IP SANs, the others DNS names. Files are written as
    ``<basename>.pem`` and ``<basename>.key`` (basename defaults to the common name made
    file-name safe).
    """
    if usage not in ("code", "server", "client", "ca"):
        raise WpkUpgradeError(f"unknown usage {usage!r} (expected code, server, client or ca)")
    issuer_cert = load_certificate(ca_cert)
    issuer_key = load_private_key(ca_key)
    if issuer_key.public_key().public_numbers() != issuer_cert.public_key().public_numbers():
        raise WpkUpgradeError(f"CA key {ca_key} does not match CA certificate {ca_cert}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = basename or _safe_name(common_name)
    cert_path, key_path = out / f"{base}.pem", out / f"{base}.key"
    _refuse_existing((cert_path, key_path), overwrite)

    key = generate_key(key_type, key_size)
    start, end = _validity(days, not_before, not_after)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_id(issuer_cert), critical=False)
    )
    if usage == "ca":
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        ).add_extension(_ca_key_usage(), critical=True)
    else:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        )
        builder = builder.add_extension(_leaf_key_usage(usage, key), critical=True)
        eku = {
            "code": ExtendedKeyUsageOID.CODE_SIGNING,
            "server": ExtendedKeyUsageOID.SERVER_AUTH,
            "client": ExtendedKeyUsageOID.CLIENT_AUTH,
        }[usage]
        builder = builder.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    names = list(san) or ([common_name] if usage == "server" else [])
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return CertFiles(cert=cert_path, key=key_path)


# --------------------------------------------------------------------------------------------
# helpers


def _validity(
    days: int, not_before: datetime | None, not_after: datetime | None
) -> tuple[datetime, datetime]:
    start = _utc(not_before) if not_before is not None else datetime.now(UTC) - CLOCK_SKEW
    end = _utc(not_after) if not_after is not None else start + timedelta(days=days)
    if end <= start:
        raise WpkUpgradeError(f"certificate validity is empty ({start} .. {end})")
    return start, end


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_key_usage(usage: Usage, key: PrivateKey) -> x509.KeyUsage:
    rsa_server = usage == "server" and isinstance(key, rsa.RSAPrivateKey)
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=rsa_server,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _general_name(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


def _safe_name(common_name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", common_name).strip("._") or "cert"
    return name[:100]


def _refuse_existing(paths: Sequence[Path], overwrite: bool) -> None:
    if overwrite:
        return
    for path in paths:
        if path.exists():
            raise WpkUpgradeError(f"{path} already exists (refusing to overwrite it)")


def _write_key(path: Path, key: PrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
