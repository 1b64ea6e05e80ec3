"""The WPK source registry: one configured driver instance per URL scheme, loaded on demand.

``[sources.<name>]`` tables of the manager configuration are each driver's options. The
``custom`` source serves ``upgrade_custom`` local files.

Source methods block (downloads, ``versions`` lookups, hashing). The kernel runs them through
``SourceRegistry.call``, on threads of their own: a slow or unreachable repository then only
slows other source calls, never the task store's calls, which share asyncio's small default
pool with everything else (hardening R6: ten requests naming a black-holed repository held
every default thread for 30 s, and every other client of the manager waited).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .drivers import SOURCES, driver_class, load_options
from .errors import PluginError, UpgradeCode, UpgradeError
from .interfaces import WpkSource

CUSTOM = "custom"
#: Threads for blocking source calls (beyond them, source calls queue; nothing else waits).
SOURCE_THREADS = 32

T = TypeVar("T")


def scheme_of(url: str) -> str:
    """``https`` of ``https://host/...``; empty when the text has no scheme."""
    head, sep, _ = url.partition("://")
    return head.lower() if sep else ""


class SourceRegistry:
    """Loads and caches the source driver for each scheme (thread-safe)."""

    def __init__(self, options: dict[str, dict[str, Any]] | None = None) -> None:
        self._options = options or {}
        self._sources: dict[str, WpkSource] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking source call on the sources' own threads."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(SOURCE_THREADS, thread_name_prefix="wpk-source")
            pool = self._pool
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))

    def close(self) -> None:
        """Stop the source threads (calls still queued are cancelled)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def get(self, name: str) -> WpkSource:
        """The source registered as ``name`` (``PluginError`` when there is none)."""
        with self._lock:
            source = self._sources.get(name)
            if source is None:
                cls = driver_class(SOURCES, name)
                config = load_options(cls, self._options.get(name), f"sources.{name}")
                source = cls(config)
                self._sources[name] = source
            return source

    def for_url(self, base_url: str) -> WpkSource:
        """The source for a repository URL, by its scheme (error 14 when none handles it)."""
        scheme = scheme_of(base_url)
        try:
            return self.get(scheme)
        except PluginError as exc:
            raise UpgradeError(
                UpgradeCode.URL_NOT_FOUND, f"no WPK source for scheme {scheme!r}: {exc}"
            ) from exc

    def custom(self) -> WpkSource:
        """The source of ``upgrade_custom`` local files."""
        return self.get(CUSTOM)
