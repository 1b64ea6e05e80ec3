"""Test helpers: a loopback web server holding a release manifest and its WPKs, and the
contract suite's publisher for it. Real sockets on 127.0.0.1, no mocks.

* ``WebServer``: serves in-memory files over HTTP or HTTPS (``Range`` supported), records
  every request, and can cut the first N WPK bodies half-way, answer 500 to the first N
  requests, or redirect a path (a ``wpk_upgrade.testing.loopback.LoopbackServer``).
* ``ManifestPublisher``: the ``WpkPublisher`` of ``wpk_upgrade.testing.source_contract``: puts
  a WPK on the server and (re)writes ``manifest.json`` to list it. It maps agents to manifest
  keys with its own table, independent of the plugin's code.
* ``lab_tls``: a CA and a server certificate for 127.0.0.1 (the kernel's ``pki`` module).
* ``closed_port``: a loopback port nothing listens on (from ``wpk_upgrade.testing.loopback``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

from wpk_upgrade import pki
from wpk_upgrade.interfaces import WpkQuery
from wpk_upgrade.testing import loopback
from wpk_upgrade.testing.loopback import Seen, closed_port
from wpk_upgrade.testing.source_contract import WpkPublisher

__all__ = [
    "Behaviour",
    "ManifestPublisher",
    "Seen",
    "WebServer",
    "closed_port",
    "lab_tls",
    "manifest_key",
]


@dataclass
class Behaviour:
    """How the server misbehaves; counters decrease as they are used."""

    cut_first: int = 0  # first N GETs of *.wpk stop after half the body
    fail_first: int = 0  # first N requests answer 500
    redirects: dict[str, str] = field(default_factory=dict)  # path -> absolute Location
    body_delay: float = 0.0  # seconds before a *.wpk body (to overlap clients)


class _Handler(loopback.LoopbackHandler):
    server: loopback.LoopbackHTTPServer[WebServer]

    def do_GET(self) -> None:
        web = self.server.owner
        path = urlsplit(self.path).path
        b = web.behaviour
        with web.lock:
            web.seen.append(Seen("GET", path, self.lower_headers()))
            fail = b.fail_first > 0
            if fail:
                b.fail_first -= 1
            cut = path.endswith(".wpk") and b.cut_first > 0 and not fail
            if cut:
                b.cut_first -= 1
            data = web.files.get(path)
        if fail:
            return self.send_status(500)
        if path in b.redirects:
            return self.send_status(302, {"Location": b.redirects[path]})
        if data is None:
            return self.send_status(404)
        return self.send_bytes(
            data, body_delay=b.body_delay if path.endswith(".wpk") else 0.0, cut=cut
        )


class WebServer(loopback.LoopbackServer):
    """In-memory files over HTTP(S) on 127.0.0.1 (a context manager)."""

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        super().__init__(_Handler, cert_chain=tls)
        self.tls = tls  # (certificate, key)
        self.behaviour = Behaviour()
        self.files: dict[str, bytes] = {}

    def start(self) -> Self:
        with self.lock:
            self.files = {}
        return super().start()

    def put(self, path: str, data: bytes) -> None:
        assert self.running
        with self.lock:
            self.files[path] = data

    def delete(self, path: str) -> None:
        assert self.running
        with self.lock:
            self.files.pop(path, None)

    def count(self, path: str) -> int:
        return sum(1 for r in self.requests if r.path == path)


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
