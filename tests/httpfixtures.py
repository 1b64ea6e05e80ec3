"""Loopback HTTP(S) servers for the source tests: real sockets on 127.0.0.1, no mocks.

* ``make_tls(dir)``: a throw-away CA and a server certificate for 127.0.0.1 / localhost.
* ``RepoServer``: serves a directory (``GET`` with ``Range``), records every request, and can
  misbehave on demand (``Behaviour``): cut the first N WPK responses half-way, answer 500 to
  the first N requests, redirect paths, stall, ignore ``Range``, answer a fixed status,
  require basic authentication.
* ``ForwardProxy``: a minimal HTTP proxy (absolute-URI ``GET`` relay and ``CONNECT`` tunnel)
  that records what it was asked.
* ``closed_port()``, ``Seen``: from ``wpk_upgrade.testing.loopback``, which also runs the
  servers (threaded, TLS, recording).

Imported by the test modules (not collected: no ``test_`` prefix).
"""

from __future__ import annotations

import datetime as dt
import http.client
import ipaddress
import select
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from wpk_upgrade.testing.loopback import (
    LoopbackHandler,
    LoopbackHTTPServer,
    LoopbackServer,
    Seen,
    closed_port,
)

__all__ = [
    "Behaviour",
    "ForwardProxy",
    "RepoServer",
    "Seen",
    "TlsFiles",
    "closed_port",
    "make_tls",
]


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a test PKI."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_tls(directory: Path) -> TlsFiles:
    """Create a CA and a server certificate (SAN 127.0.0.1, ::1, localhost) under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wpk-upgrade test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                    x509.DNSName("localhost"),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.server_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


@dataclass
class Behaviour:
    """How a ``RepoServer`` misbehaves; counters decrease as they are used."""

    drop_first: int = 0  # first N responses for *.wpk paths stop after half the body
    fail_first: int = 0  # first N requests (matching fail_suffix) answer 500
    fail_suffix: str = ""
    stall_first: int = 0  # first N requests sleep stall_seconds before answering
    stall_seconds: float = 0.0
    ignore_range: bool = False  # answer 200 with the whole file to Range requests
    redirects: dict[str, str] = field(default_factory=dict)  # path -> absolute Location
    statuses: dict[str, int] = field(default_factory=dict)  # path -> fixed status
    body_delay: float = 0.0  # sleep before sending a *.wpk body (to overlap clients)
    basic_auth: str | None = None  # expected "Basic ..." header value


class _Handler(LoopbackHandler):
    server: LoopbackHTTPServer[RepoServer]

    def do_GET(self) -> None:
        repo = self.server.owner
        path = urlsplit(self.path).path
        repo.record(Seen("GET", path, self.lower_headers()))
        b = repo.behaviour
        with repo.lock:
            stall = b.stall_first > 0
            if stall:
                b.stall_first -= 1
            fail = b.fail_first > 0 and path.endswith(b.fail_suffix)
            if fail:
                b.fail_first -= 1
            drop = b.drop_first > 0 and path.endswith(".wpk")
            if drop:
                b.drop_first -= 1
        if stall:
            time.sleep(b.stall_seconds)
        if b.basic_auth is not None and self.headers.get("Authorization") != b.basic_auth:
            return self._status(401)
        if path in b.redirects:
            return self.send_status(302, {"Location": b.redirects[path]})
        if path in b.statuses:
            return self._status(b.statuses[path])
        if fail:
            return self._status(500)
        target = repo.root.joinpath(*[p for p in path.split("/") if p])
        if ".." in path.split("/") or not target.is_file():
            return self._status(404)
        return self.send_bytes(
            target.read_bytes(),
            use_range=not b.ignore_range,
            content_type="application/octet-stream",
            body_delay=b.body_delay if path.endswith(".wpk") else 0.0,
            cut=drop,
        )

    def _status(self, code: int) -> None:
        self.send_status(code, body=f"status {code}\n".encode())


class RepoServer(LoopbackServer):
    """A directory served over HTTP or HTTPS on 127.0.0.1 (a context manager)."""

    def __init__(self, root: Path, tls: TlsFiles | None = None) -> None:
        chain = None if tls is None else (tls.server_cert, tls.server_key)
        super().__init__(_Handler, cert_chain=chain)
        self.root = root
        self.tls = tls
        self.behaviour = Behaviour()

    def start(self) -> Self:
        self.root.mkdir(parents=True, exist_ok=True)
        return super().start()

    @property
    def base_url(self) -> str:
        return self.url + "/"

    def count(self, suffix: str) -> int:
        """How many requests asked for a path ending in ``suffix``."""
        return sum(1 for r in self.requests if r.path.endswith(suffix))

    def put(self, rel_path: str, data: bytes) -> None:
        """Publish a file at ``rel_path`` under the served root."""
        target = self.root / rel_path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


# --------------------------------------------------------------------------- proxy


class _ProxyHandler(LoopbackHandler):
    server: LoopbackHTTPServer[ForwardProxy]
    protocol_version = "HTTP/1.0"

    def do_CONNECT(self) -> None:
        self.server.owner.record(Seen("CONNECT", self.path, dict(self.headers.items())))
        host, _, port = self.path.rpartition(":")
        try:
            upstream = socket.create_connection((host, int(port)), timeout=10)
        except OSError:
            self.send_error(502)
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        conns = [self.connection, upstream]
        try:
            while True:
                readable, _, _ = select.select(conns, [], [], 10)
                if not readable:
                    break
                done = False
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        done = True
                        break
                    (upstream if s is self.connection else self.connection).sendall(data)
                if done:
                    break
        except OSError:
            pass
        finally:
            upstream.close()
        self.close_connection = True

    def do_GET(self) -> None:
        self.server.owner.record(Seen("GET", self.path, dict(self.headers.items())))
        parts = urlsplit(self.path)
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=10)
        try:
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            headers = {
                k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection",)
            }
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        finally:
            conn.close()


class ForwardProxy(LoopbackServer):
    """A recording HTTP forward proxy on 127.0.0.1 (a context manager)."""

    def __init__(self) -> None:
        super().__init__(_ProxyHandler)
