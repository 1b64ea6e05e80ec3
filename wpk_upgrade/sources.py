"""The WPK source registry: one configured driver instance per URL scheme, loaded on demand.

``[sources.<name>]`` tables of the manager configuration are each driver's options. The
``custom`` source serves ``upgrade_custom`` local files.
"""

from __future__ import annotations

import threading
from typing import Any

from .drivers import SOURCES, driver_class, load_options
from .errors import PluginError, UpgradeCode, UpgradeError
from .interfaces import WpkSource

CUSTOM = "custom"


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
