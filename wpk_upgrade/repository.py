"""Base class of repository-shaped WPK sources: layout + ``versions`` file -> WPK candidate.

``RepositorySource`` implements ``resolve`` and ``latest_version`` once for every source whose
store follows the reference layout (https/http, file://, s3://...). A subclass provides two
primitives: ``read_text`` (a small text file, for ``versions``) and ``fetch`` (the WPK bytes
from an offset). ``versions`` reads are cached per URL for a short time and de-duplicated
between threads, so a thousand agents upgrading at once cause one read.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from . import versions_file
from .errors import UpgradeCode, UpgradeError
from .interfaces import ProgressFn, WpkCandidate, WpkQuery, WpkSource
from .layout import V4_9, locate
from .versions_file import MAX_VERSIONS_SIZE, VersionEntry

log = logging.getLogger(__name__)


def redact_url(url: str) -> str:
    """``url`` without its secret (``https://user:***@host/``, ``https://***@host/`` for a bare
    token), safe to log or show."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None and "@" not in parts.netloc:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    # a user name alone may itself be a token: hide it too
    netloc = f"{user}:***@{hostport}" if user and colon else f"***@{hostport}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass
class _Slot:
    lock: threading.Lock
    expires: float = 0.0
    entries: list[VersionEntry] | None = None
    error: UpgradeError | None = None


class VersionsCache:
    """Per-URL cache of parsed ``versions`` files, thread-safe, with one loader at a time.

    Successful reads live ``ttl`` seconds, failures ``error_ttl`` seconds (so an unreachable
    repository is not asked again by every waiting agent).
    """

    def __init__(
        self,
        ttl: float = 30.0,
        error_ttl: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.error_ttl = error_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}

    def get(self, url: str, load: Callable[[], list[VersionEntry]]) -> list[VersionEntry]:
        """The entries at ``url``, calling ``load`` only when nothing fresh is cached."""
        with self._lock:
            slot = self._slots.get(url)
            if slot is None:
                slot = self._slots[url] = _Slot(threading.Lock())
        with slot.lock:
            now = self._clock()
            if now < slot.expires:
                if slot.error is not None:
                    raise UpgradeError(slot.error.code, slot.error.detail)
                assert slot.entries is not None
                return slot.entries
            try:
                entries = load()
            except UpgradeError as exc:
                slot.entries, slot.error = None, exc
                slot.expires = self._clock() + self.error_ttl
                raise
            slot.entries, slot.error = entries, None
            slot.expires = self._clock() + self.ttl
            return entries

    def clear(self) -> None:
        """Forget everything (tests, or after a repository was re-published)."""
        with self._lock:
            self._slots.clear()


class RepositorySource(WpkSource):
    """A WPK source laid out as the reference repository (``<dir>versions`` + WPK files).

    Subclasses implement ``read_text`` and ``fetch``; ``resolve`` and ``latest_version`` come
    from here. Class attributes ``versions_ttl`` / ``versions_error_ttl`` tune the cache.
    """

    versions_ttl: float = 30.0
    versions_error_ttl: float = 5.0

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.versions_cache = VersionsCache(self.versions_ttl, self.versions_error_ttl)

    # ------------------------------------------------------------------ primitives
    @abstractmethod
    def read_text(self, url: str, limit: int) -> str:
        """The text at ``url`` (at most ``limit`` bytes, decoded as UTF-8).

        Raises ``UpgradeError`` 14 with a precise detail when it cannot be read (unreachable,
        missing, HTTP status >= 400, larger than ``limit``).
        """

    @abstractmethod
    def fetch(
        self, candidate: WpkCandidate, out: IO[bytes], offset: int, progress: ProgressFn
    ) -> None:
        """See ``WpkSource.fetch``."""

    # ------------------------------------------------------------------ versions
    def versions(self, dir_url: str) -> list[VersionEntry]:
        """Parsed ``<dir_url>versions`` (cached briefly); ``UpgradeError`` 14 when unreadable."""
        url = dir_url + "versions"

        def load() -> list[VersionEntry]:
            text = self.read_text(url, MAX_VERSIONS_SIZE)
            entries = versions_file.parse(text)
            log.debug("read %d entries from %s", len(entries), redact_url(url))
            return entries

        return self.versions_cache.get(url, load)

    # ------------------------------------------------------------------ WpkSource
    def resolve(self, query: WpkQuery) -> WpkCandidate:
        """Locate the WPK of ``query.version`` through the ``versions`` file of its directory."""
        dir_url, file_name = locate(query)
        entry = versions_file.find(self.versions(dir_url), query.version)
        if entry is None:
            raise UpgradeError(
                UpgradeCode.WPK_VERSION_DOES_NOT_EXIST,
                f"{query.version} is not listed in {redact_url(dir_url + 'versions')}",
            )
        return WpkCandidate(
            url=dir_url + file_name, file_name=file_name, sha1=entry.sha1, sha256=entry.sha256
        )

    def latest_version(self, query: WpkQuery) -> str | None:
        """The highest version resolvable for the agent's platform, or None (decision D1).

        The directory depends on the target (>= v4.9.0 layout or older), so both the
        >= v4.9.0 directory and the v3.4.0-v4.9.0 one are read. An entry counts only when
        resolving its version would lead back to the directory it was listed in, so the
        answer is always resolvable. Unreachable directories are skipped.
        """
        found: list[VersionEntry] = []
        seen: set[str] = set()
        for probe in (V4_9, "v4.8.0"):
            try:
                dir_url, _ = locate(replace(query, version=probe))
            except UpgradeError:
                continue
            if dir_url in seen:
                continue
            seen.add(dir_url)
            try:
                entries = self.versions(dir_url)
            except UpgradeError as exc:
                log.debug("no versions at %s: %s", redact_url(dir_url), exc)
                continue
            for entry in entries:
                try:
                    if locate(replace(query, version=entry.version))[0] == dir_url:
                        found.append(entry)
                except UpgradeError:
                    continue
        best = versions_file.latest(found)
        return best.version if best is not None else None
