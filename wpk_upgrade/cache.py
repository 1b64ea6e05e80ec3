"""The manager's WPK cache: one verified download per WPK file, shared by every task.

``WpkCache.obtain`` returns a ``WpkRef`` to a file in the cache directory whose SHA1 (and
SHA-256 when the source publishes one) matches what the source announced:

* a cached file with the right digest is reused without any download (reference §5.5,
  compared case-insensitively);
* concurrent callers asking for the same file wait for one download and share its outcome;
* a download goes to ``<name>.part``; when the source fails mid-way, the next attempt resumes
  from the part's size (up to ``attempts`` attempts, sleeping ``backoff[i]`` seconds between
  them: 1, 2, 3, 4 s by default as in the reference);
* a digest mismatch is ``UpgradeError`` 17 ("expected X got Y") and the bad file is deleted
  (the reference left it in place); a part that pre-existed this call is distrusted first:
  on mismatch it is discarded and downloaded once more from byte 0;
* a verified file is renamed atomically into ``<cache_dir>/<file_name>``.

The cache is per process: two processes sharing one directory may both download a file, and
the atomic rename keeps the result consistent.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UpgradeCode, UpgradeError
from .interfaces import ProgressFn, WpkCandidate, WpkSource
from .models import WpkRef

log = logging.getLogger(__name__)

_BLOCK = 1024 * 1024
_NAME = re.compile(r"^[A-Za-z0-9_+\-][A-Za-z0-9_.+\-]{0,254}$")


def check_file_name(name: str) -> str:
    """``name`` when it is a plain file name fit for the cache, else ``UpgradeError`` 16."""
    if not _NAME.match(name or "") or ".." in name or name.endswith(".part"):
        raise UpgradeError(UpgradeCode.WPK_FILE_DOES_NOT_EXIST, f"invalid WPK file name {name!r}")
    return name


def file_digests(path: Path) -> tuple[str, str, int]:
    """(sha1, sha256, size) of a file, lowercase hex, read in 1 MiB blocks."""
    sha1, sha256, size = hashlib.sha1(), hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            sha1.update(block)
            sha256.update(block)
            size += len(block)
    return sha1.hexdigest(), sha256.hexdigest(), size


def _norm(digest: str | None) -> str | None:
    return digest.strip().lower() if digest else None


@dataclass
class _Flight:
    """One in-progress ``obtain`` that other threads wait for."""

    key: tuple[str, str | None, str | None]
    done: threading.Event = field(default_factory=threading.Event)
    ref: WpkRef | None = None
    error: BaseException | None = None


@dataclass(frozen=True)
class _Known:
    ref: WpkRef
    stamp: tuple[int, int, int]


class WpkCache:
    """Verified WPK files under ``cache_dir`` (see the module docstring). Thread-safe."""

    def __init__(
        self,
        cache_dir: Path,
        attempts: int = 5,
        backoff: Sequence[float] = (1.0, 2.0, 3.0, 4.0),
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.attempts = max(1, attempts)
        self.backoff = tuple(backoff)
        self._sleep = sleep
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight] = {}
        self._known: dict[str, _Known] = {}

    def path_of(self, file_name: str) -> Path:
        """Where ``file_name`` lives in the cache (validated name)."""
        return self.cache_dir / check_file_name(file_name)

    # ------------------------------------------------------------------ public
    def obtain(
        self, source: WpkSource, candidate: WpkCandidate, progress: ProgressFn | None = None
    ) -> WpkRef:
        """A verified local copy of ``candidate`` (blocking; one download per file at a time).

        Raises ``UpgradeError`` 16 when the file cannot be fetched after every attempt (or the
        cache cannot be written) and 17 when its digest does not match.
        """
        name = check_file_name(candidate.file_name)
        key = (name, _norm(candidate.sha1), _norm(candidate.sha256))
        while True:
            with self._lock:
                flight = self._flights.get(name)
                leader = flight is None
                if flight is None:
                    flight = self._flights[name] = _Flight(key)
            if leader:
                try:
                    flight.ref = self._obtain(source, candidate, name, progress)
                    return flight.ref
                except BaseException as exc:
                    flight.error = exc
                    raise
                finally:
                    with self._lock:
                        del self._flights[name]
                    flight.done.set()
            flight.done.wait()
            if flight.key != key:
                continue  # another WPK under the same name: take our own turn
            if flight.ref is not None:
                return flight.ref
            err = flight.error
            if isinstance(err, UpgradeError):
                raise UpgradeError(err.code, err.detail) from err
            raise UpgradeError(UpgradeCode.WPK_FILE_DOES_NOT_EXIST, str(err)) from err

    # ------------------------------------------------------------------ internals
    def _obtain(
        self,
        source: WpkSource,
        candidate: WpkCandidate,
        name: str,
        progress: ProgressFn | None,
    ) -> WpkRef:
        want_sha1, want_sha256 = _norm(candidate.sha1), _norm(candidate.sha256)
        dest = self.cache_dir / name
        part = self.cache_dir / (name + ".part")
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            cached = self._cached(dest, want_sha1, want_sha256)
            if cached is not None:
                log.debug("WPK %s found in cache", name)
                return cached
            resumed = part.exists() and part.stat().st_size > 0
            self._download(source, candidate, part, progress)
            sha1, sha256, size = file_digests(part)
            if resumed and not self._matches(sha1, sha256, want_sha1, want_sha256):
                log.info("WPK %s: stale partial download discarded, downloading again", name)
                part.unlink()
                self._download(source, candidate, part, progress)
                sha1, sha256, size = file_digests(part)
            if not self._matches(sha1, sha256, want_sha1, want_sha256):
                part.unlink(missing_ok=True)
                if want_sha1 and sha1 != want_sha1:
                    detail = f"expected {want_sha1} got {sha1} (SHA1 of {name})"
                else:
                    detail = f"expected {want_sha256} got {sha256} (SHA-256 of {name})"
                raise UpgradeError(UpgradeCode.WPK_SHA1_DOES_NOT_MATCH, detail)
            if candidate.size is not None and size != candidate.size:
                log.warning("WPK %s: %d bytes, the source announced %d", name, size, candidate.size)
            os.replace(part, dest)
        except OSError as exc:
            raise UpgradeError(
                UpgradeCode.WPK_FILE_DOES_NOT_EXIST, f"cache {self.cache_dir}: {exc}"
            ) from exc
        ref = WpkRef(path=str(dest), file_name=name, sha1=sha1, sha256=sha256, size=size)
        self._remember(dest, ref)
        return ref

    @staticmethod
    def _matches(sha1: str, sha256: str, want_sha1: str | None, want_sha256: str | None) -> bool:
        return (want_sha1 is None or sha1 == want_sha1) and (
            want_sha256 is None or sha256 == want_sha256
        )

    def _stamp(self, path: Path) -> tuple[int, int, int]:
        st = path.stat()
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _remember(self, path: Path, ref: WpkRef) -> None:
        with self._lock:
            self._known[ref.file_name] = _Known(ref, self._stamp(path))

    def _cached(self, dest: Path, want_sha1: str | None, want_sha256: str | None) -> WpkRef | None:
        if want_sha1 is None and want_sha256 is None:
            return None  # nothing to check a cached copy against: download again
        if not dest.is_file():
            return None
        with self._lock:
            known = self._known.get(dest.name)
        if known is not None and known.stamp == self._stamp(dest):
            ref = known.ref
            if self._matches(ref.sha1, ref.sha256 or "", want_sha1, want_sha256):
                return ref
            return None
        sha1, sha256, size = file_digests(dest)
        ref = WpkRef(path=str(dest), file_name=dest.name, sha1=sha1, sha256=sha256, size=size)
        self._remember(dest, ref)
        if self._matches(sha1, sha256, want_sha1, want_sha256):
            return ref
        log.info("WPK %s in cache has another digest; downloading it again", dest.name)
        return None

    def _download(
        self,
        source: WpkSource,
        candidate: WpkCandidate,
        part: Path,
        progress: ProgressFn | None,
    ) -> None:
        report = progress or (lambda _n: None)
        last: BaseException | None = None
        for attempt in range(1, self.attempts + 1):
            offset = part.stat().st_size if part.exists() else 0
            if candidate.size is not None and offset > candidate.size:
                offset = 0
            mode = "r+b" if part.exists() else "wb"
            with open(part, mode) as out:
                out.seek(offset)
                out.truncate()
                try:
                    source.fetch(candidate, out, offset, report)
                    return
                except (UpgradeError, OSError) as exc:
                    last = exc
            detail = exc_detail(last)
            log.warning(
                "WPK %s: download attempt %d/%d failed: %s",
                candidate.file_name,
                attempt,
                self.attempts,
                detail,
            )
            if attempt < self.attempts:
                delay = self.backoff[min(attempt - 1, len(self.backoff) - 1)] if self.backoff else 0
                self._sleep(delay)
        assert last is not None
        raise UpgradeError(
            UpgradeCode.WPK_FILE_DOES_NOT_EXIST,
            f"{candidate.file_name}: {self.attempts} attempts failed, last: {exc_detail(last)}",
        ) from last


def exc_detail(exc: BaseException) -> str:
    """The precise part of an error for a detail text (``detail`` of coded errors)."""
    detail = getattr(exc, "detail", None)
    return str(detail) if detail else str(exc)
