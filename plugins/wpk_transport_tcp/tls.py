"""Mutual TLS for the ``tcp`` transport: SSL contexts, agent identity, revocation list.

Both sides authenticate with certificates:

* the manager presents ``cert``/``key`` and accepts only agents whose client certificate
  chains to ``ca`` (the agent CA); the agent presents its own ``cert``/``key`` and accepts only a
  manager certificate that chains to its ``ca`` (the manager CA) and names ``server_name`` (or
  the host of ``address``) in its subjectAltName;
* an agent certificate names its agent in the subject common name: ``CN=agent:<id>``
  (decimal, zero-padded to at least three digits by ``wpk-upgrade ca issue-agent``, e.g.
  ``agent:005``). ``agent_id_of`` reads it;
* ``crl`` (manager side) is a PEM or DER revocation list signed by the agent CA; a certificate
  whose serial is listed is refused. The file is re-read whenever it changes on disk (so
  ``wpk-upgrade ca revoke`` takes effect without a restart: the transport also drops the
  connected agents it now revokes, see ``TcpTransport._watch_crl``). A CRL
  that cannot be read or whose signature does not verify refuses every agent (fail closed);
  an expired one is still applied, with a warning.

TLS 1.2 is the minimum version.

``set_read_buffer`` sizes asyncio's per-connection TLS read buffer for the manager process:
``asyncio.sslproto.SSLProtocol`` allocates ``max_size`` bytes (256 KiB, zero-filled, so
resident) for every TLS connection, which dominates a manager's memory with thousands of
agents connected (bench P5); what the manager reads from agents is small replies.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from wpk_upgrade.errors import ConfigError

log = logging.getLogger(__name__)

AGENT_CN = re.compile(r"^agent:(\d{1,9})$")


def set_read_buffer(size: int) -> None:
    """Every TLS connection asyncio makes in this process from now on reads through a
    ``size``-byte buffer (``SSLProtocol.max_size``; the ones already open keep theirs)."""
    from asyncio import sslproto

    if getattr(sslproto.SSLProtocol, "max_size", None) != size:
        sslproto.SSLProtocol.max_size = size
        log.debug("asyncio TLS read buffer: %d bytes per connection", size)


def agent_common_name(agent_id: int) -> str:
    """The subject common name of agent ``agent_id``'s certificate (``agent:005``)."""
    return f"agent:{agent_id:03d}"


def agent_id_of(cert: x509.Certificate) -> int | None:
    """The agent id a client certificate names (``CN=agent:<id>``), or None."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        return None
    value = names[0].value
    match = AGENT_CN.match(value if isinstance(value, str) else value.decode(errors="replace"))
    if match is None:
        return None
    agent_id = int(match.group(1))
    return agent_id if agent_id > 0 else None


def _need(path: str | None, what: str) -> str:
    if not path:
        raise ConfigError(f"tcp transport: TLS needs {what}")
    if not Path(path).is_file():
        raise ConfigError(f"tcp transport: {what} {path} does not exist")
    return path


def _load_chain(context: ssl.SSLContext, cert: str | None, key: str | None) -> None:
    cert_path, key_path = _need(cert, "cert"), _need(key, "key")
    try:
        context.load_cert_chain(cert_path, key_path)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"tcp transport: cannot load cert {cert_path} / key {key_path}: {exc}"
        ) from exc


def _load_ca(context: ssl.SSLContext, ca: str | None) -> None:
    ca_path = _need(ca, "ca")
    try:
        context.load_verify_locations(cafile=ca_path)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"tcp transport: cannot load ca {ca_path}: {exc}") from exc


def server_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    """The manager's context: its certificate, and client certificates required from ``ca``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, cert, key)
    _load_ca(context, ca)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    """An agent's context: its client certificate, the manager verified against ``ca``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, cert, key)
    _load_ca(context, ca)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def peer_certificate(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> x509.Certificate | None:
    """The verified peer certificate of a TLS connection, parsed."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    return x509.load_der_x509_certificate(der)


@dataclass
class _Loaded:
    stamp: tuple[int, int, int]
    serials: frozenset[int]
    next_update: datetime | None


class RevocationList:
    """The agent CRL, re-read when the file changes (``is_revoked`` is cheap otherwise)."""

    def __init__(self, path: str, ca: str | None) -> None:
        self.path = Path(path)
        self.ca = ca
        self._loaded: _Loaded | None = None
        self._warned_expiry = False

    def _issuers(self) -> list[x509.Certificate]:
        if not self.ca:
            return []
        try:
            return x509.load_pem_x509_certificates(Path(self.ca).read_bytes())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read CA {self.ca}: {exc}") from exc

    def _load(self) -> _Loaded:
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if self._loaded is not None and self._loaded.stamp == stamp:
            return self._loaded
        data = self.path.read_bytes()
        try:
            crl = (
                x509.load_pem_x509_crl(data)
                if data.lstrip().startswith(b"-----")
                else x509.load_der_x509_crl(data)
            )
        except ValueError as exc:
            raise ValueError(f"{self.path} is not a CRL: {exc}") from exc
        issuers = [c for c in self._issuers() if c.subject == crl.issuer]
        if not issuers:
            raise ValueError(f"{self.path} is not issued by the agent CA")
        if not any(_signature_valid(crl, issuer) for issuer in issuers):
            raise ValueError(f"{self.path}: the CRL signature does not verify")
        serials = frozenset(entry.serial_number for entry in crl)
        loaded = _Loaded(stamp, serials, crl.next_update_utc)
        self._loaded = loaded
        self._warned_expiry = False
        log.info("tcp: revocation list %s loaded (%d revoked)", self.path, len(serials))
        return loaded

    def refresh(self) -> bool:
        """Re-read the file if it changed; True when it was (re)loaded now.
        ``ValueError``/``OSError`` when it is unusable."""
        before = self._loaded
        return self._load() is not before

    def is_revoked(self, serial: int) -> bool:
        """True when ``serial`` is listed; ``ValueError``/``OSError`` when the CRL is unusable."""
        loaded = self._load()
        if (
            loaded.next_update is not None
            and loaded.next_update < datetime.now(UTC)
            and not self._warned_expiry
        ):
            self._warned_expiry = True
            log.warning("tcp: revocation list %s is past its next update; still applied", self.path)
        return serial in loaded.serials


def _signature_valid(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    try:
        return bool(crl.is_signature_valid(issuer.public_key()))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
