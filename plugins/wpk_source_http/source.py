"""``HttpRepositorySource``: the reference repository layout served over HTTP(S).

Behaviour, option by option (``HttpSourceConfigSchema``):

* ``ca_bundle``: PEM file of trusted CAs for https; default: the system store.
* ``timeout`` (20 s): socket timeout of every request (connect, and each read while
  streaming), so also the stall detector of downloads. ``download_timeout`` (300 s): wall time
  allowed for one ``fetch`` (or ``read_text``) call, retries included.
* ``retries`` (5): extra attempts after a transient failure (connection reset or aborted,
  timeout, short body, HTTP 5xx/408/429), sleeping ``backoff * n`` seconds before the n-th;
  a download that made progress since the last failure starts counting again. Permanent
  failures (HTTP 4xx, refused connection, DNS, TLS verification) are not retried here.
* ``max_redirects`` (5): redirects followed (301/302/303/307/308); a redirect from https to
  anything but https, or to a non-http(s) scheme, is refused.
* ``proxy``: unset (None) uses the ``http_proxy``/``https_proxy``/``no_proxy`` environment
  variables as urllib does (https goes through the proxy with ``CONNECT``, so TLS stays end to
  end); a URL forces that proxy for both schemes; ``""`` disables proxies.
* ``user_agent``.

Resume: ``fetch`` asks for ``Range: bytes=<offset>-``. A 206 must start at that offset. A
server that answers 200 (it ignores ranges) sends the whole file: the output is rewound to
where byte 0 belongs (``out.tell() - offset`` at the call) and truncated, and the body is
written from the start; an output that cannot seek then gives 16. A 416 whose
``Content-Range`` total equals the offset means the file is already complete.

Errors: ``read_text`` raises ``UpgradeError`` 14 (repository not reachable), ``fetch`` 16
(WPK file does not exist), each with the URL (password removed), the HTTP status or the OS
error in ``detail``. Credentials in a URL (``https://user:pass@host/``) are sent as HTTP basic
authentication, only to that host (not forwarded on redirects), and never logged.
"""

from __future__ import annotations

import base64
import http.client
import logging
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import unquote, urlsplit, urlunsplit

from marshmallow import Schema, fields, post_load, validate

from wpk_upgrade import __version__
from wpk_upgrade.errors import UpgradeCode, UpgradeError
from wpk_upgrade.interfaces import ProgressFn, WpkCandidate
from wpk_upgrade.repository import RepositorySource, redact_url

log = logging.getLogger(__name__)

BLOCK_SIZE = 1024 * 1024
_TRANSIENT_STATUS = frozenset({408, 429})
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class HttpSourceConfig:
    """Options of ``HttpRepositorySource`` (see the module docstring)."""

    ca_bundle: str | None = None
    timeout: float = 20.0
    download_timeout: float = 300.0
    retries: int = 5
    backoff: float = 1.0
    user_agent: str = f"wpk-upgrade/{__version__}"
    max_redirects: int = 5
    proxy: str | None = None


class HttpSourceConfigSchema(Schema):
    """marshmallow schema of ``[sources.https]`` / ``[sources.http]`` options."""

    ca_bundle = fields.String(load_default=None, allow_none=True)
    timeout = fields.Float(load_default=20.0, validate=validate.Range(min=0.01, max=3600))
    download_timeout = fields.Float(
        load_default=300.0, validate=validate.Range(min=0.01, max=7 * 86400)
    )
    retries = fields.Integer(load_default=5, validate=validate.Range(0, 100))
    backoff = fields.Float(load_default=1.0, validate=validate.Range(0, 600))
    user_agent = fields.String(
        load_default=f"wpk-upgrade/{__version__}", validate=validate.Length(1, 256)
    )
    max_redirects = fields.Integer(load_default=5, validate=validate.Range(0, 50))
    proxy = fields.String(load_default=None, allow_none=True)

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> HttpSourceConfig:
        return HttpSourceConfig(**data)


class _Retry(Exception):
    """A transient failure: try again (``counted`` False for an immediate, free retry)."""

    def __init__(self, detail: str, counted: bool = True) -> None:
        super().__init__(detail)
        self.detail = detail
        self.counted = counted
        self.progressed = False


class _Permanent(Exception):
    """A failure retrying will not fix."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class _RedirectRefused(urllib.error.URLError):
    pass


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    def __init__(self, max_redirects: int) -> None:
        self.max_redirections = max_redirects

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        old_scheme = urlsplit(req.full_url).scheme.lower()
        new_scheme = urlsplit(newurl).scheme.lower()
        if new_scheme not in ("http", "https") or (old_scheme == "https" and new_scheme != "https"):
            raise _RedirectRefused(
                f"refused redirect from {redact_url(req.full_url)} to {redact_url(newurl)}"
            )
        if self.max_redirections <= 0:
            raise _RedirectRefused(f"redirect to {redact_url(newurl)} but redirects are disabled")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _classify(exc: BaseException) -> tuple[str, bool]:
    """(detail, transient) of an error raised while talking HTTP."""
    if isinstance(exc, urllib.error.HTTPError):
        code = exc.code
        transient = code >= 500 or code in _TRANSIENT_STATUS
        return f"HTTP {code} {exc.reason}".rstrip(), transient
    if isinstance(exc, _RedirectRefused):
        return str(exc.reason), False
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        if isinstance(reason, BaseException):
            return _classify(reason)
        return str(reason), False
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message or exc}", False
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return f"connection lost: {exc}", True
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc}", False
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out", True
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host: {exc}", False
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused: {exc}", False
    if isinstance(exc, ConnectionError):
        return f"connection lost: {exc}", True
    if isinstance(exc, http.client.InvalidURL):  # a malformed URL never gets better
        return f"invalid URL: {exc}", False
    if isinstance(exc, http.client.HTTPException):
        return f"bad HTTP response: {exc!r}", True
    if isinstance(exc, OSError):
        return str(exc), False
    return repr(exc), False


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total length) of a ``Content-Range`` header; None where unknown."""
    m = _CONTENT_RANGE.match(value or "")
    if not m:
        return None, None
    first = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(3)) if m.group(3) != "*" else None
    return first, total


@dataclass
class _State:
    pos: int
    base: int | None


class HttpRepositorySource(RepositorySource):
    """Reference-layout WPK repository over HTTP(S). Blocking and thread-safe."""

    name = "http"
    config_schema = HttpSourceConfigSchema

    def __init__(self, config: Any = None) -> None:
        if config is None:
            config = HttpSourceConfig()
        elif isinstance(config, dict):
            config = HttpSourceConfigSchema().load(config)
        super().__init__(config)
        self.cfg: HttpSourceConfig = config
        self._ctx: ssl.SSLContext | None = None
        self._ctx_lock = threading.Lock()
        self.sleep = time.sleep

    # ------------------------------------------------------------------ plumbing
    def _context(self) -> ssl.SSLContext:
        with self._ctx_lock:
            if self._ctx is None:
                try:
                    if self.cfg.ca_bundle:
                        self._ctx = ssl.create_default_context(cafile=self.cfg.ca_bundle)
                    else:
                        self._ctx = ssl.create_default_context()
                except (OSError, ssl.SSLError) as exc:
                    where = self.cfg.ca_bundle or "system store"
                    raise _Permanent(f"cannot load CA certificates ({where}): {exc}") from exc
            return self._ctx

    def _opener(self) -> urllib.request.OpenerDirector:
        if self.cfg.proxy is None:
            proxy = urllib.request.ProxyHandler()
        elif self.cfg.proxy == "":
            proxy = urllib.request.ProxyHandler({})
        else:
            proxy = urllib.request.ProxyHandler({"http": self.cfg.proxy, "https": self.cfg.proxy})
        return urllib.request.build_opener(
            proxy,
            urllib.request.HTTPSHandler(context=self._context()),
            _RedirectHandler(self.cfg.max_redirects),
        )

    def _open(self, url: str, headers: dict[str, str], timeout: float) -> Any:
        """Send a GET; raises urllib/OS errors (classified by the callers)."""
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https"):
            raise _Permanent(f"unsupported URL scheme {parts.scheme!r}")
        auth = None
        if parts.username is not None or "@" in parts.netloc:
            userinfo, _, hostport = parts.netloc.rpartition("@")
            user, _, password = userinfo.partition(":")
            token = f"{unquote(user)}:{unquote(password)}".encode()
            auth = "Basic " + base64.b64encode(token).decode("ascii")
            url = urlunsplit((parts.scheme, hostport, parts.path, parts.query, parts.fragment))
        req = urllib.request.Request(url, headers={"User-Agent": self.cfg.user_agent, **headers})
        if auth:
            req.add_unredirected_header("Authorization", auth)
        return self._opener().open(req, timeout=timeout)

    def _with_retries(self, what: str, url: str, deadline: float, attempt: Any) -> Any:
        """Run ``attempt()`` until it succeeds, retrying ``_Retry`` with backoff.

        Returns its result; raises ``_Permanent`` with the final detail.
        """
        failures = 0
        while True:
            try:
                return attempt()
            except _Retry as exc:
                if not exc.counted:
                    continue
                if exc.progressed:
                    failures = 0  # bytes arrived since the last failure: a fresh budget
                failures += 1
                delay = self.cfg.backoff * failures
                if failures > self.cfg.retries:
                    tries = failures
                    raise _Permanent(f"{exc.detail} (gave up after {tries} attempts)") from exc
                if time.monotonic() + delay > deadline:
                    raise _Permanent(f"{exc.detail} (time limit reached)") from exc
                log.info(
                    "%s %s: %s; retry %d/%d in %.1fs",
                    what,
                    redact_url(url),
                    exc.detail,
                    failures,
                    self.cfg.retries,
                    delay,
                )
                self.sleep(delay)

    # ------------------------------------------------------------------ versions
    def read_text(self, url: str, limit: int) -> str:
        """GET a small text file; ``UpgradeError`` 14 when unreachable or >= 400 or too big."""
        safe = redact_url(url)
        deadline = time.monotonic() + self.cfg.download_timeout

        def attempt() -> bytes:
            try:
                resp = self._open(url, {}, self.cfg.timeout)
            except _Permanent:
                raise
            except Exception as exc:
                detail, transient = _classify(exc)
                _close_error(exc)
                raise (_Retry(detail) if transient else _Permanent(detail)) from exc
            with resp:
                try:
                    data = resp.read(limit + 1)
                except Exception as exc:
                    detail, transient = _classify(exc)
                    raise (_Retry(detail) if transient else _Permanent(detail)) from exc
                if len(data) > limit:
                    raise _Permanent(f"body larger than {limit} bytes")
                expected = _int(resp.headers.get("Content-Length"))
                if expected is not None and len(data) < expected:
                    raise _Retry(f"connection closed after {len(data)} of {expected} bytes")
                return bytes(data)

        try:
            data = self._with_retries("GET", url, deadline, attempt)
        except _Permanent as exc:
            raise UpgradeError(UpgradeCode.URL_NOT_FOUND, f"GET {safe}: {exc.detail}") from exc
        except (OSError, ValueError) as exc:  # CA bundle unreadable, malformed URL
            raise UpgradeError(UpgradeCode.URL_NOT_FOUND, f"GET {safe}: {exc}") from exc
        return data.decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ download
    def fetch(
        self, candidate: WpkCandidate, out: IO[bytes], offset: int, progress: ProgressFn
    ) -> None:
        """Stream the WPK from ``offset`` into ``out`` (see the module docstring)."""
        url = candidate.url
        safe = redact_url(url)
        try:
            base: int | None = out.tell() - offset
        except (OSError, AttributeError, ValueError):
            base = None
        state = _State(pos=offset, base=base)
        deadline = time.monotonic() + self.cfg.download_timeout

        def attempt() -> None:
            before = state.pos
            try:
                self._fetch_once(url, out, state, progress, deadline)
            except _Retry as exc:
                exc.progressed = state.pos > before
                raise

        try:
            self._with_retries("GET", url, deadline, attempt)
        except _Permanent as exc:
            raise UpgradeError(
                UpgradeCode.WPK_FILE_DOES_NOT_EXIST, f"GET {safe}: {exc.detail}"
            ) from exc
        except (OSError, ValueError) as exc:
            raise UpgradeError(UpgradeCode.WPK_FILE_DOES_NOT_EXIST, f"GET {safe}: {exc}") from exc

    def _restart(self, out: IO[bytes], state: _State) -> None:
        if state.base is None:
            raise _Permanent("server ignored the Range request and the output cannot rewind")
        out.seek(state.base)
        out.truncate()
        state.pos = 0

    def _fetch_once(
        self,
        url: str,
        out: IO[bytes],
        state: _State,
        progress: ProgressFn,
        deadline: float,
    ) -> None:
        headers = {"Range": f"bytes={state.pos}-"} if state.pos > 0 else {}
        try:
            resp = self._open(url, headers, self.cfg.timeout)
        except urllib.error.HTTPError as exc:
            _close_error(exc)
            if exc.code == 416 and state.pos > 0:
                _, total = _content_range(exc.headers.get("Content-Range"))
                if total == state.pos:
                    return  # what we already hold is the whole file
                self._restart(out, state)
                raise _Retry("HTTP 416 for our range; restarting from 0", counted=False) from exc
            detail, transient = _classify(exc)
            raise (_Retry(detail) if transient else _Permanent(detail)) from exc
        except _Permanent:
            raise
        except Exception as exc:
            detail, transient = _classify(exc)
            raise (_Retry(detail) if transient else _Permanent(detail)) from exc

        with resp:
            status = resp.status
            if state.pos > 0:
                if status == 206:
                    first, _ = _content_range(resp.headers.get("Content-Range"))
                    if first != state.pos:
                        raise _Permanent(
                            f"asked bytes from {state.pos}, got Content-Range "
                            f"{resp.headers.get('Content-Range')!r}"
                        )
                else:
                    log.info("%s ignored Range; downloading from 0", redact_url(url))
                    self._restart(out, state)
            expected = _int(resp.headers.get("Content-Length"))
            received = 0
            while True:
                if time.monotonic() > deadline:
                    raise _Permanent(
                        f"download_timeout of {self.cfg.download_timeout:g}s reached "
                        f"after {state.pos} bytes"
                    )
                try:
                    block = resp.read(BLOCK_SIZE)
                except Exception as exc:
                    detail, transient = _classify(exc)
                    raise (_Retry(detail) if transient else _Permanent(detail)) from exc
                if not block:
                    break
                try:
                    out.write(block)
                except OSError as exc:
                    raise _Permanent(f"cannot write the WPK locally: {exc}") from exc
                state.pos += len(block)
                received += len(block)
                progress(len(block))
            if expected is not None and received < expected:
                raise _Retry(f"connection closed after {received} of {expected} bytes")


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _close_error(exc: BaseException) -> None:
    """Close the body of an ``HTTPError`` (it holds the connection open)."""
    if isinstance(exc, urllib.error.HTTPError):
        try:
            exc.close()
        except Exception as close_exc:  # noqa: BLE001 - best effort only
            log.debug("closing an HTTP error body failed: %s", close_exc)
