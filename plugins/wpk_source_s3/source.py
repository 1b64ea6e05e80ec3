"""``S3RepositorySource``: the reference repository layout in an S3 bucket.

A repository base ``s3://bucket/prefix/`` maps ``<base>windows/versions`` to the object
``prefix/windows/versions`` of ``bucket`` (percent-escapes in the key are decoded). Objects
are read with ``GetObject``; nothing else is needed, so a read-only policy
(``s3:GetObject`` on ``bucket/prefix/*``) is enough.

Credentials come from boto3's standard chain (environment, shared config and credentials
files, container or instance role, SSO...), optionally from one named ``profile``; they are
never part of the options and never logged. Options (``S3SourceConfigSchema``,
``[sources.s3]``):

* ``endpoint_url``: an S3-compatible endpoint (MinIO, Ceph, moto...); default: AWS.
* ``region``: the bucket's region; default: from the profile or environment.
* ``profile``: a profile of the shared AWS files; default: the standard chain.
* ``addressing_style``: ``auto`` (default), ``path`` or ``virtual``.
* ``ca_bundle``: PEM file of CAs trusted for an https endpoint; default: botocore's.
* ``timeout`` (20 s): connect timeout and read timeout of every request, so also the stall
  detector while streaming.
* ``retries`` (3): botocore's standard retries of a request (throttling, 5xx, connection
  errors), and how many times a download cut in the middle is resumed without progress.
* ``backoff`` (1 s): sleep ``backoff * n`` before the n-th resumption.

Downloads stream in 1 MiB blocks. ``fetch`` from an offset sends ``Range: bytes=<offset>-``;
resuming inside one call adds ``If-Match`` with the object's ETag, so a WPK replaced in the
middle of a download restarts from byte 0 instead of splicing two files. An offset equal to
the object's size (``InvalidRange``) means the file is already complete.

Errors: ``read_text`` raises ``UpgradeError`` 14 (repository not reachable) and ``fetch``
16 (WPK file does not exist), with the object's ``s3://`` URL and S3's error code and message
(``NoSuchBucket``, ``NoSuchKey``, ``AccessDenied``...), or the connection error, in
``detail``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import unquote, urlsplit

from marshmallow import Schema, fields, post_load, validate

from wpk_upgrade import __version__
from wpk_upgrade.errors import UpgradeCode, UpgradeError
from wpk_upgrade.interfaces import ProgressFn, WpkCandidate
from wpk_upgrade.repository import RepositorySource

log = logging.getLogger(__name__)

BLOCK_SIZE = 1024 * 1024
MISSING_BOTO3 = "the s3 source needs boto3, which is not installed: pip install 'wpk-upgrade[s3]'"
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class S3SourceConfig:
    """Options of ``S3RepositorySource`` (see the module docstring)."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    addressing_style: str = "auto"
    ca_bundle: str | None = None
    timeout: float = 20.0
    retries: int = 3
    backoff: float = 1.0


class S3SourceConfigSchema(Schema):
    """marshmallow schema of ``[sources.s3]`` options."""

    endpoint_url = fields.Url(
        load_default=None, allow_none=True, schemes={"http", "https"}, require_tld=False
    )
    region = fields.String(
        load_default=None, allow_none=True, validate=validate.Regexp(r"^[a-z0-9-]{1,64}$")
    )
    profile = fields.String(load_default=None, allow_none=True, validate=validate.Length(1, 128))
    addressing_style = fields.String(
        load_default="auto", validate=validate.OneOf(["auto", "path", "virtual"])
    )
    ca_bundle = fields.String(load_default=None, allow_none=True)
    timeout = fields.Float(load_default=20.0, validate=validate.Range(min=0.01, max=3600))
    retries = fields.Integer(load_default=3, validate=validate.Range(0, 20))
    backoff = fields.Float(load_default=1.0, validate=validate.Range(0, 600))

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> S3SourceConfig:
        return S3SourceConfig(**data)


def split_s3_url(url: str) -> tuple[str, str]:
    """(bucket, key) of ``s3://bucket/key``; ``ValueError`` when it is not one."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "s3":
        raise ValueError(f"not an s3:// URL: {url!r}")
    if not parts.netloc or "@" in parts.netloc or ":" in parts.netloc:
        raise ValueError(f"{url!r} does not name a bucket (s3://bucket/prefix/)")
    key = unquote(parts.path.lstrip("/"))
    if not key or "\x00" in key:
        raise ValueError(f"{url!r} does not name an object")
    return parts.netloc, key


class _Failed(Exception):
    """A failure retrying here will not fix; ``detail`` says what happened."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class _Cut(Exception):
    """The body stopped before its end: resume from the current position."""

    progressed = False  # bytes arrived since the previous failure

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class _Again(Exception):
    """Start over at once (the output was rewound); not counted as a failure."""


class _RangeRefused(Exception):
    """``InvalidRange``: the offset is at or past the object's end."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(_describe(exc))
        size = None
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            raw = (response.get("Error") or {}).get("ActualObjectSize")
            if raw is not None and str(raw).isdigit():
                size = int(raw)
        self.object_size = size


class _Changed(Exception):
    """``PreconditionFailed`` on ``If-Match``: the object was replaced."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(_describe(exc))


@dataclass
class _Download:
    bucket: str
    key: str
    pos: int
    base: int | None
    etag: str | None = None


def _describe(exc: BaseException) -> str:
    """S3's error code and message, or the connection error, for a ``detail``."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error") or {}
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        code = error.get("Code") or "error"
        message = error.get("Message") or ""
        text = f"{code}: {message}" if message and message != code else str(code)
        return f"{text} (HTTP {status})" if status else text
    return str(exc) or type(exc).__name__


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str((response.get("Error") or {}).get("Code") or "")
    return ""


class S3RepositorySource(RepositorySource):
    """Reference-layout WPK repository in an S3 bucket. Blocking and thread-safe."""

    name = "s3"
    config_schema = S3SourceConfigSchema

    def __init__(self, config: Any = None) -> None:
        if config is None:
            config = S3SourceConfig()
        elif isinstance(config, dict):
            config = S3SourceConfigSchema().load(config)
        super().__init__(config)
        self.cfg: S3SourceConfig = config
        self._client: Any = None
        self._client_lock = threading.Lock()
        self.sleep = time.sleep

    # ------------------------------------------------------------------ plumbing
    def client(self) -> Any:
        """The boto3 S3 client, created on first use (boto3 clients are thread-safe).

        Raises ``_Failed`` when boto3 is missing or the profile cannot be loaded.
        """
        with self._client_lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> Any:
        try:
            import boto3
            from botocore.config import Config
            from botocore.exceptions import BotoCoreError
        except ImportError as exc:
            raise _Failed(MISSING_BOTO3) from exc
        cfg = self.cfg
        try:
            session = boto3.session.Session(profile_name=cfg.profile, region_name=cfg.region)
            return session.client(
                "s3",
                endpoint_url=cfg.endpoint_url,
                verify=cfg.ca_bundle if cfg.ca_bundle else None,
                config=Config(
                    connect_timeout=cfg.timeout,
                    read_timeout=cfg.timeout,
                    retries={"mode": "standard", "max_attempts": cfg.retries + 1},
                    s3={"addressing_style": cfg.addressing_style},
                    user_agent_extra=f"wpk-upgrade/{__version__}",
                ),
            )
        except (BotoCoreError, ValueError) as exc:
            raise _Failed(f"cannot set up the S3 client: {exc}") from exc

    def _get(self, dl: _Download) -> Any:
        """``GetObject`` from ``dl.pos`` (with ``If-Match`` once the ETag is known)."""
        client = self.client()  # first: it reports a missing boto3
        from botocore.exceptions import BotoCoreError, ClientError

        args: dict[str, Any] = {"Bucket": dl.bucket, "Key": dl.key}
        if dl.pos > 0:
            args["Range"] = f"bytes={dl.pos}-"
        if dl.etag:
            args["IfMatch"] = dl.etag
        try:
            return client.get_object(**args)
        except ClientError as exc:
            code = _error_code(exc)
            if code == "InvalidRange" and dl.pos > 0:
                raise _RangeRefused(exc) from exc
            if code == "PreconditionFailed" and dl.etag:
                raise _Changed(exc) from exc
            raise _Failed(_describe(exc)) from exc
        except BotoCoreError as exc:  # connection errors, after botocore's own retries
            raise _Failed(_describe(exc)) from exc

    def _resuming(self, what: str, url: str, attempt: Any) -> Any:
        """Run ``attempt()``, resuming after ``_Cut`` (``retries`` times without progress)."""
        failures = 0
        while True:
            try:
                return attempt()
            except _Again:
                continue
            except _Cut as exc:
                if exc.progressed:
                    failures = 0
                failures += 1
                if failures > self.cfg.retries:
                    raise _Failed(f"{exc.detail} (gave up after {failures} attempts)") from exc
                delay = self.cfg.backoff * failures
                log.info("%s %s: %s; resuming in %.1fs", what, url, exc.detail, delay)
                self.sleep(delay)

    # ------------------------------------------------------------------ versions
    def read_text(self, url: str, limit: int) -> str:
        """The object's text; ``UpgradeError`` 14 when unreadable or larger than ``limit``."""
        try:
            bucket, key = split_s3_url(url)
        except ValueError as exc:
            raise UpgradeError(UpgradeCode.URL_NOT_FOUND, str(exc)) from exc
        dl = _Download(bucket, key, 0, None)

        def attempt() -> bytes:
            resp = self._get(dl)
            body = resp["Body"]
            try:
                length = resp.get("ContentLength")
                if length is not None and length > limit:
                    raise _Failed(f"larger than {limit} bytes ({length})")
                try:
                    data = body.read(limit + 1)
                except Exception as exc:
                    raise _Cut(_describe(exc)) from exc
            finally:
                body.close()
            if len(data) > limit:
                raise _Failed(f"larger than {limit} bytes")
            return bytes(data)

        try:
            data = self._resuming("GetObject", url, attempt)
        except (_Failed, _RangeRefused, _Changed) as exc:
            raise UpgradeError(UpgradeCode.URL_NOT_FOUND, f"GET {url}: {exc}") from exc
        return data.decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ download
    def fetch(
        self, candidate: WpkCandidate, out: IO[bytes], offset: int, progress: ProgressFn
    ) -> None:
        """Stream the WPK from ``offset`` into ``out`` (see the module docstring)."""
        url = candidate.url
        try:
            bucket, key = split_s3_url(url)
        except ValueError as exc:
            raise UpgradeError(UpgradeCode.WPK_FILE_DOES_NOT_EXIST, str(exc)) from exc
        try:
            base: int | None = out.tell() - offset
        except (OSError, AttributeError, ValueError):
            base = None
        dl = _Download(bucket, key, offset, base)

        def attempt() -> None:
            before = dl.pos
            try:
                self._fetch_once(dl, out, progress)
            except _Cut as exc:
                exc.progressed = dl.pos > before
                raise

        try:
            self._resuming("GetObject", url, attempt)
        except (_Failed, _RangeRefused, _Changed) as exc:
            raise UpgradeError(UpgradeCode.WPK_FILE_DOES_NOT_EXIST, f"GET {url}: {exc}") from exc

    def _restart(self, out: IO[bytes], dl: _Download, why: str) -> None:
        """Rewind ``out`` to where byte 0 belongs and download everything again."""
        if dl.base is None:
            raise _Failed(f"{why}, and the output cannot rewind")
        log.info("s3://%s/%s: %s; downloading from byte 0", dl.bucket, dl.key, why)
        out.seek(dl.base)
        out.truncate()
        dl.pos, dl.etag = 0, None

    def _fetch_once(self, dl: _Download, out: IO[bytes], progress: ProgressFn) -> None:
        try:
            resp = self._get(dl)
        except _RangeRefused as exc:
            size = exc.object_size
            if size is not None and size == dl.pos:
                return  # what the output holds is already the whole object
            self._restart(out, dl, f"no bytes from {dl.pos} on (object size {size})")
            raise _Again() from exc
        except _Changed as exc:
            self._restart(out, dl, "the object changed during the download")
            raise _Again() from exc
        body = resp["Body"]
        try:
            if dl.pos > 0:
                first = _range_start(resp.get("ContentRange"))
                if first is None:
                    self._restart(out, dl, "the store ignored the Range request")
                elif first != dl.pos:
                    raise _Failed(
                        f"asked bytes from {dl.pos}, got ContentRange {resp.get('ContentRange')!r}"
                    )
            dl.etag = resp.get("ETag") or None
            expected = resp.get("ContentLength")
            received = 0
            chunks = body.iter_chunks(BLOCK_SIZE)
            while True:
                try:
                    block = next(chunks, b"")
                except Exception as exc:
                    raise _Cut(_describe(exc)) from exc
                if not block:
                    break
                try:
                    out.write(block)
                except OSError as exc:
                    raise _Failed(f"cannot write the WPK locally: {exc}") from exc
                dl.pos += len(block)
                received += len(block)
                progress(len(block))
        finally:
            body.close()
        if expected is not None and received < expected:
            raise _Cut(f"connection closed after {received} of {expected} bytes")


def _range_start(value: str | None) -> int | None:
    m = _CONTENT_RANGE.match(value or "")
    return int(m.group(1)) if m else None
