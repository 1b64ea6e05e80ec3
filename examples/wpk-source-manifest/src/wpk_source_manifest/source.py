"""``ManifestSource``: WPKs listed in a JSON release manifest on a web server.

Repository URLs: ``manifest+https://host/path/manifest.json`` (or ``manifest+http://``). The
kernel picks this source by the scheme before ``://`` (the entry-point names) and hands over
the URL with a ``/`` appended; a base that ends in a directory reads ``<dir>manifest.json``.

Options (``ManifestSourceConfigSchema``, ``[sources."manifest+https"]`` in the manager's TOML):

* ``ca_bundle``: PEM file of trusted CAs; default: the system store.
* ``timeout`` (20 s): socket timeout of each request (connect, and each read while streaming).
* ``retries`` (3): a download cut or failing transiently (timeouts, resets, 5xx) is resumed
  this many times in a row without progress, sleeping ``backoff * n`` seconds before the n-th.
* ``manifest_ttl`` (30 s): how long a manifest is reused (failures: 5 s), so a thousand agents
  upgrading at once cause one read.
* ``max_manifest_size`` (1 MiB).

Everything is standard library (urllib + ssl) and the kernel's public API: the plugin shares
no code with the built-in HTTP source. Redirects are followed except from https to anything
else; environment proxies apply as urllib applies them.

Errors, as the kernel's contract asks: manifest unreadable or not a manifest -> 14; version not
in the manifest -> 15; version listed but no WPK for the agent's OS / package type / arch -> 9;
WPK download failing -> 16.
"""

from __future__ import annotations

import http.client
import logging
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urlsplit

from marshmallow import Schema, fields, post_load, validate
from wpk_upgrade.errors import UpgradeCode, UpgradeError
from wpk_upgrade.interfaces import ProgressFn, WpkCandidate, WpkQuery, WpkSource
from wpk_upgrade.repository import redact_url

from .manifest import Manifest, ManifestError, agent_target, parse, pick

log = logging.getLogger(__name__)

PREFIX = "manifest+"
DEFAULT_NAME = "manifest.json"
BLOCK_SIZE = 256 * 1024
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class ManifestSourceConfig:
    """Options of ``ManifestSource`` (see the module docstring)."""

    ca_bundle: str | None = None
    timeout: float = 20.0
    retries: int = 3
    backoff: float = 1.0
    manifest_ttl: float = 30.0
    max_manifest_size: int = 1024 * 1024


class ManifestSourceConfigSchema(Schema):
    """marshmallow schema of ``[sources."manifest+https"]`` options."""

    ca_bundle = fields.String(load_default=None, allow_none=True)
    timeout = fields.Float(load_default=20.0, validate=validate.Range(min=0.01, max=3600))
    retries = fields.Integer(load_default=3, validate=validate.Range(0, 100))
    backoff = fields.Float(load_default=1.0, validate=validate.Range(0, 600))
    manifest_ttl = fields.Float(load_default=30.0, validate=validate.Range(0, 86400))
    max_manifest_size = fields.Integer(
        load_default=1024 * 1024, validate=validate.Range(1024, 64 * 1024 * 1024)
    )

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> ManifestSourceConfig:
        return ManifestSourceConfig(**data)


def manifest_url(base_url: str) -> str:
    """The http(s) URL of the manifest named by a ``manifest+http(s)://`` base URL."""
    if not base_url.lower().startswith(PREFIX):
        raise ValueError(f"not a manifest+http(s):// URL: {redact_url(base_url)!r}")
    url = base_url[len(PREFIX) :]
    if urlsplit(url).scheme.lower() not in ("http", "https"):
        raise ValueError(f"not a manifest+http(s):// URL: {redact_url(base_url)!r}")
    path = urlsplit(url).path
    if path.endswith(".json/"):
        return url[:-1]  # the kernel appends "/" to repository URLs
    if path.endswith(".json"):
        return url
    return (url if url.endswith("/") else url + "/") + DEFAULT_NAME


# --------------------------------------------------------------------------- HTTP plumbing


class _Transient(Exception):
    """Worth another try (timeouts, resets, 5xx, a body cut short)."""


class _Permanent(Exception):
    """Retrying will not help (4xx, refused connection, TLS verification...)."""


class _NoDowngrade(urllib.request.HTTPRedirectHandler):
    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        old = urlsplit(req.full_url).scheme.lower()
        new = urlsplit(newurl).scheme.lower()
        if new not in ("http", "https") or (old == "https" and new != "https"):
            raise _Permanent(f"refused redirect to {redact_url(newurl)}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _failure(exc: BaseException) -> Exception:
    """Classify an exception raised while talking HTTP."""
    if isinstance(exc, _Permanent | _Transient):
        return exc
    if isinstance(exc, urllib.error.HTTPError):
        text = f"HTTP {exc.code} {exc.reason}".rstrip()
        return _Transient(text) if exc.code >= 500 or exc.code in (408, 429) else _Permanent(text)
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        return _failure(reason) if isinstance(reason, BaseException) else _Permanent(str(reason))
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _Permanent(f"TLS certificate verification failed: {exc.verify_message or exc}")
    if isinstance(exc, TimeoutError | socket.timeout):
        return _Transient("timed out")
    if isinstance(exc, ConnectionRefusedError | socket.gaierror):
        return _Permanent(f"cannot connect: {exc}")
    if isinstance(exc, ConnectionError | http.client.HTTPException | ssl.SSLError):
        return _Transient(f"connection lost: {exc!r}")
    return _Permanent(str(exc) or type(exc).__name__)


@dataclass
class _Slot:
    lock: threading.Lock
    expires: float = 0.0
    manifest: Manifest | None = None
    error: UpgradeError | None = None


class ManifestSource(WpkSource):
    """WPKs listed in a JSON release manifest over HTTP(S). Blocking and thread-safe."""

    name = "manifest+https"
    config_schema = ManifestSourceConfigSchema
    error_ttl = 5.0

    def __init__(self, config: Any = None) -> None:
        if config is None:
            config = ManifestSourceConfig()
        elif isinstance(config, dict):
            config = ManifestSourceConfigSchema().load(config)
        super().__init__(config)
        self.cfg: ManifestSourceConfig = config
        self._ssl: ssl.SSLContext | None = None
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}
        self.sleep: Callable[[float], None] = time.sleep

    def _open(self, url: str, headers: dict[str, str]) -> Any:
        with self._lock:
            if self._ssl is None:
                try:
                    self._ssl = ssl.create_default_context(cafile=self.cfg.ca_bundle)
                except (OSError, ssl.SSLError) as exc:
                    where = self.cfg.ca_bundle or "the system store"
                    raise _Permanent(f"cannot load CA certificates from {where}: {exc}") from exc
            context = self._ssl
        opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=context), _NoDowngrade()
        )
        request = urllib.request.Request(url, headers=headers)
        return opener.open(request, timeout=self.cfg.timeout)

    # ------------------------------------------------------------------ the manifest
    def manifest(self, base_url: str) -> Manifest:
        """The manifest named by ``base_url`` (cached ``manifest_ttl`` seconds); error 14."""
        try:
            url = manifest_url(base_url)
        except ValueError as exc:
            raise UpgradeError(UpgradeCode.URL_NOT_FOUND, str(exc)) from exc
        with self._lock:
            slot = self._slots.setdefault(url, _Slot(threading.Lock()))
        with slot.lock:  # one reader per manifest; the others wait and share its result
            if time.monotonic() < slot.expires:
                if slot.error is not None:
                    raise UpgradeError(slot.error.code, slot.error.detail)
                assert slot.manifest is not None
                return slot.manifest
            try:
                slot.manifest, slot.error = self._load(url), None
                slot.expires = time.monotonic() + self.cfg.manifest_ttl
                return slot.manifest
            except UpgradeError as exc:
                slot.manifest, slot.error = None, exc
                slot.expires = time.monotonic() + self.error_ttl
                raise

    def _load(self, url: str) -> Manifest:
        safe = redact_url(url)
        limit = self.cfg.max_manifest_size
        failures = 0
        while True:
            try:
                with self._open(url, {"Accept": "application/json"}) as resp:
                    data = resp.read(limit + 1)
                break
            except Exception as exc:
                failure = _failure(exc)
                failures += 1
                if isinstance(failure, _Permanent) or failures > self.cfg.retries:
                    raise UpgradeError(UpgradeCode.URL_NOT_FOUND, f"GET {safe}: {failure}") from exc
                self.sleep(self.cfg.backoff * failures)
        if len(data) > limit:
            raise UpgradeError(UpgradeCode.URL_NOT_FOUND, f"GET {safe}: larger than {limit} bytes")
        try:
            manifest = parse(data, url)
        except ManifestError as exc:
            raise UpgradeError(UpgradeCode.URL_NOT_FOUND, f"{safe}: {exc}") from exc
        for reason in manifest.skipped:
            log.warning("%s: skipped %s", safe, reason)
        return manifest

    # ------------------------------------------------------------------ WpkSource
    def resolve(self, query: WpkQuery) -> WpkCandidate:
        """The manifest's WPK of ``query.version`` for the agent (errors 14, 15, 9)."""
        manifest = self.manifest(query.base_url)
        where = redact_url(manifest_url(query.base_url))
        release = manifest.find(query.version)
        if release is None:
            raise UpgradeError(
                UpgradeCode.WPK_VERSION_DOES_NOT_EXIST, f"{query.version} is not listed in {where}"
            )
        target = agent_target(query.os_platform, query.os_arch, query.package_type)
        entry = pick(release.wpks, target)
        if entry is None:
            hint = " (no package type: give package_type)" if target.package_type is None else ""
            raise UpgradeError(
                UpgradeCode.SYSTEM_NOT_SUPPORTED,
                f"{release.version} has no WPK for {target} in {where}{hint}",
            )
        return WpkCandidate(
            url=entry.url,
            file_name=entry.file_name,
            sha1=entry.sha1,
            sha256=entry.sha256,
            size=entry.size,
        )

    def latest_version(self, query: WpkQuery) -> str | None:
        """The newest version with a WPK for the agent's platform; None when unknown."""
        try:
            manifest = self.manifest(query.base_url)
        except UpgradeError as exc:
            log.debug("no manifest for %s: %s", redact_url(query.base_url), exc)
            return None
        target = agent_target(query.os_platform, query.os_arch, query.package_type)
        release = manifest.latest_for(target)
        return release.version if release is not None else None

    def fetch(
        self, candidate: WpkCandidate, out: IO[bytes], offset: int, progress: ProgressFn
    ) -> None:
        """Stream the WPK from ``offset`` on, resuming with ``Range`` after a cut (error 16)."""
        safe = redact_url(candidate.url)
        try:
            base: int | None = out.tell() - offset
        except (OSError, AttributeError, ValueError):
            base = None
        pos, failures = offset, 0
        while True:
            before = pos
            try:
                pos = self._fetch_once(candidate.url, out, pos, base, progress)
                return
            except _Transient as exc:
                pos = getattr(exc, "pos", pos)
                failures = 1 if pos > before else failures + 1
                if failures > self.cfg.retries:
                    raise UpgradeError(
                        UpgradeCode.WPK_FILE_DOES_NOT_EXIST,
                        f"GET {safe}: {exc} (gave up after {failures} attempts)",
                    ) from exc
                log.info("GET %s: %s; resuming from byte %d", safe, exc, pos)
                self.sleep(self.cfg.backoff * failures)
            except _Permanent as exc:
                missing = UpgradeCode.WPK_FILE_DOES_NOT_EXIST
                raise UpgradeError(missing, f"GET {safe}: {exc}") from exc

    def _fetch_once(
        self, url: str, out: IO[bytes], pos: int, base: int | None, progress: ProgressFn
    ) -> int:
        """One GET from ``pos``; returns the final position. ``_Transient`` carries ``pos``."""
        headers = {"Range": f"bytes={pos}-"} if pos > 0 else {}
        try:
            resp = self._open(url, headers)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416 and pos > 0:
                m = _CONTENT_RANGE.match(exc.headers.get("Content-Range") or "")
                if m and m.group(2) == str(pos):
                    return pos  # the output already holds the whole file
                return self._fetch_once(url, out, self._rewind(out, base), base, progress)
            raise _failure(exc) from exc
        except Exception as exc:
            raise _failure(exc) from exc
        with resp:
            if pos > 0 and resp.status != 206:  # the server ignored Range: take it whole
                pos = self._rewind(out, base)
            elif pos > 0:
                m = _CONTENT_RANGE.match(resp.headers.get("Content-Range") or "")
                if not m or m.group(1) != str(pos):
                    raise _Permanent(f"asked bytes from {pos}, got {resp.headers['Content-Range']}")
            length = resp.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            received = 0
            while True:
                try:
                    block = resp.read(BLOCK_SIZE)
                except Exception as exc:
                    failure = _failure(exc)
                    failure.pos = pos  # type: ignore[attr-defined]
                    raise failure from exc
                if not block:
                    break
                try:
                    out.write(block)
                except OSError as exc:
                    raise _Permanent(f"cannot write the WPK locally: {exc}") from exc
                pos += len(block)
                received += len(block)
                progress(len(block))
        if expected is not None and received < expected:
            cut = _Transient(f"connection closed after {received} of {expected} bytes")
            cut.pos = pos  # type: ignore[attr-defined]
            raise cut
        return pos

    @staticmethod
    def _rewind(out: IO[bytes], base: int | None) -> int:
        """Go back to where byte 0 belongs (the server cannot serve our range); returns 0."""
        if base is None:
            raise _Permanent("cannot resume here and the output cannot rewind")
        out.seek(base)
        out.truncate()
        return 0
