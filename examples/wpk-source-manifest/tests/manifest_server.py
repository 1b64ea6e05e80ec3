"""Test helpers: a loopback web server holding a release manifest and its WPKs, and the
contract suite's publisher for it. Real sockets on 127.0.0.1, no mocks.

* ``WebServer``: serves in-memory files over HTTP or HTTPS (``Range`` supported), records
  every request, and can cut the first N WPK bodies half-way, answer 500 to the first N
  requests, or redirect a path.
* ``ManifestPublisher``: the ``WpkPublisher`` of ``wpk_upgrade.testing.source_contract``: puts
  a WPK on the server and (re)writes ``manifest.json`` to list it. It maps agents to manifest
  keys with its own table, independent of the plugin's code.
* ``lab_tls``: a CA and a server certificate for 127.0.0.1 (the kernel's ``pki`` module).
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from wpk_upgrade import pki
from wpk_upgrade.interfaces import WpkQuery
from wpk_upgrade.testing.source_contract import WpkPublisher


@dataclass(frozen=True)
class Seen:
    """One request the server received."""

    path: str
    headers: dict[str, str]


@dataclass
class Behaviour:
    """How the server misbehaves; counters decrease as they are used."""

    cut_first: int = 0  # first N GETs of *.wpk stop after half the body
    fail_first: int = 0  # first N requests answer 500
    redirects: dict[str, str] = field(default_factory=dict)  # path -> absolute Location
    body_delay: float = 0.0  # seconds before a *.wpk body (to overlap clients)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        path = urlsplit(self.path).path
        b = srv.behaviour
        with srv.lock:
            srv.seen.append(Seen(path, {k.lower(): v for k, v in self.headers.items()}))
            fail = b.fail_first > 0
            if fail:
                b.fail_first -= 1
            cut = path.endswith(".wpk") and b.cut_first > 0 and not fail
            if cut:
                b.cut_first -= 1
            data = srv.files.get(path)
        if fail:
            return self._empty(500)
        if path in b.redirects:
            return self._empty(302, {"Location": b.redirects[path]})
        if data is None:
            return self._empty(404)
        status, body, extra = 200, data, {}
        start = _range_start(self.headers.get("Range"))
        if start is not None:
            if start >= len(data):
                return self._empty(416, {"Content-Range": f"bytes */{len(data)}"})
            status, body = 206, data[start:]
            extra["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self.send_response(status)
        for k, v in extra.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if path.endswith(".wpk") and b.body_delay:
            threading.Event().wait(b.body_delay)
        if cut:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return None
        self.wfile.write(body)
        return None

    def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()


def _range_start(value: str | None) -> int | None:
    if not value or not value.startswith("bytes="):
        return None
    first = value[len("bytes=") :].split("-", 1)[0]
    return int(first) if first.isdigit() else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    files: dict[str, bytes]
    behaviour: Behaviour
    lock: threading.Lock
    seen: list[Seen]


class WebServer:
    """In-memory files over HTTP(S) on 127.0.0.1 (a context manager)."""

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        self.tls = tls  # (certificate, key)
        self.behaviour = Behaviour()
        self._server: _Server | None = None

    def __enter__(self) -> WebServer:
        srv = _Server(("127.0.0.1", 0), _Handler)
        srv.files, srv.behaviour, srv.lock, srv.seen = {}, self.behaviour, threading.Lock(), []
        if self.tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self.tls)
            srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        self._server = srv
        thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
        thread.daemon = True
        thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        """``http(s)://127.0.0.1:<port>`` (no trailing slash)."""
        assert self._server is not None
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self._server.server_address[1]}"

    def put(self, path: str, data: bytes) -> None:
        assert self._server is not None
        with self._server.lock:
            self._server.files[path] = data

    def delete(self, path: str) -> None:
        assert self._server is not None
        with self._server.lock:
            self._server.files.pop(path, None)

    @property
    def requests(self) -> list[Seen]:
        assert self._server is not None
        with self._server.lock:
            return list(self._server.seen)

    def count(self, path: str) -> int:
        return sum(1 for r in self.requests if r.path == path)


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lab_tls(directory: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) for 127.0.0.1."""
    ca = pki.create_ca(directory / "ca", key_type="ec")
    server = pki.issue_certificate(
        ca.cert, ca.key, directory / "server", "127.0.0.1", "server", key_type="ec"
    )
    return ca.cert, server.cert, server.key


# --------------------------------------------------------------------------- publisher

_DEB_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
_MAC_ARCH = {"x86_64": "intel64", "aarch64": "arm64"}


def manifest_key(query: WpkQuery) -> dict[str, str]:
    """The manifest fields that name the WPK of an agent (the official repository's names)."""
    platform = query.os_platform.lower()
    arch = query.os_arch or ""
    if platform == "windows":
        return {"os": "windows"}
    if platform == "darwin":
        return {"os": "macos", "package_type": "pkg", "arch": _MAC_ARCH.get(arch, arch)}
    pkg = query.package_type or "none"
    return {
        "os": "linux",
        "package_type": pkg,
        "arch": _DEB_ARCH.get(arch, arch) if pkg == "deb" else arch,
    }


class ManifestPublisher(WpkPublisher):
    """Publishes WPKs on a ``WebServer`` and lists them in ``<directory>manifest.json``."""

    def __init__(self, server: WebServer, directory: str = "/releases/") -> None:
        self.server = server
        self.manifest_path = directory + "manifest.json"
        scheme = "manifest+" + urlsplit(server.url).scheme
        self.base_url = f"{scheme}://{urlsplit(server.url).netloc}{self.manifest_path}"
        self.releases: dict[str, list[dict[str, Any]]] = {}
        self.order: list[str] = []

    def _entry_list(self, version: str) -> list[dict[str, Any]]:
        if version not in self.releases:
            self.releases[version] = []
            self.order.append(version)
        return self.releases[version]

    def _add(self, version: str, entry: dict[str, Any]) -> None:
        key = {k: entry.get(k) for k in ("os", "package_type", "arch")}
        entries = self._entry_list(version)
        entries[:] = [e for e in entries if {k: e.get(k) for k in key} != key]
        entries.append(entry)

    def publish(
        self,
        query: WpkQuery,
        data: bytes,
        *,
        others: Any = (),
        uppercase: bool = False,
        sha1: str | None = None,
        sha256: bool | str = False,
    ) -> str:
        key = manifest_key(query)
        label = "_".join(key.values())
        for version, digest in others:
            self._add(version, {**key, "url": f"wpk/{version}/{label}.wpk", "sha1": digest})
        file_name = f"agent_{query.version}_{label}.wpk"
        path = f"/files/{query.version}/{file_name}"
        self.server.put(path, data)
        digest = sha1 or hashlib.sha1(data).hexdigest()
        entry: dict[str, Any] = {
            **key,
            "url": path,  # absolute path: resolved against the manifest URL
            "sha1": digest.upper() if uppercase else digest,
            "size": len(data),
        }
        if isinstance(sha256, str):
            entry["sha256"] = sha256
        elif sha256:
            entry["sha256"] = hashlib.sha256(data).hexdigest()
        self._add(query.version, entry)
        self.write()
        return digest

    def write(self) -> None:
        doc = {
            "format": 1,
            "releases": [{"version": v, "wpks": self.releases[v]} for v in self.order],
        }
        self.server.put(self.manifest_path, json.dumps(doc, indent=1).encode())
