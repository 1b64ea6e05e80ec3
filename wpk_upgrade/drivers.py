"""stevedore glue: load the one driver per role that the configuration names.

Groups: ``wpk_upgrade.sources`` (named by URL scheme, plus ``custom``), ``wpk_upgrade.stores``
(named by database URL scheme) and ``wpk_upgrade.transports`` (named in config). Built-in
drivers are entry points of our own distribution, exactly like a third-party one.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, TypeVar

from marshmallow import ValidationError
from stevedore import driver
from stevedore.exception import NoMatches

from .errors import PluginError

SOURCES = "wpk_upgrade.sources"
STORES = "wpk_upgrade.stores"
TRANSPORTS = "wpk_upgrade.transports"

T = TypeVar("T")


def driver_class(group: str, name: str) -> type:
    """The class registered under ``name`` in ``group``; ``PluginError`` when absent or broken."""
    try:
        mgr = driver.DriverManager(namespace=group, name=name, invoke_on_load=False)
    except NoMatches as exc:
        known = ", ".join(sorted(available(group))) or "none"
        raise PluginError(f"no {group} driver named {name!r} (installed: {known})") from exc
    except ImportError as exc:
        raise PluginError(f"{group} driver {name!r} cannot be imported: {exc}") from exc
    except RuntimeError as exc:
        raise PluginError(f"{group} driver {name!r}: {exc}") from exc
    return mgr.driver  # type: ignore[no-any-return]


def load_options(cls: type, options: dict[str, Any] | None, where: str) -> Any:
    """Validate a driver's options with its ``config_schema`` (None when it has no schema)."""
    schema_cls = getattr(cls, "config_schema", None)
    if schema_cls is None:
        if options:
            raise PluginError(f"{where}: driver {cls.__name__} takes no options")
        return None
    try:
        return schema_cls().load(options or {})
    except ValidationError as exc:
        raise PluginError(f"{where}: {_flatten(exc.messages)}") from exc


def available(group: str) -> dict[str, str]:
    """Every entry point of ``group``: name -> ``module:attr`` (and its distribution)."""
    found: dict[str, str] = {}
    for ep in entry_points(group=group):
        dist = ep.dist.name if ep.dist is not None else "?"
        found[ep.name] = f"{ep.value} ({dist})"
    return found


def _flatten(messages: Any, prefix: str = "") -> str:
    if isinstance(messages, dict):
        return "; ".join(_flatten(v, f"{prefix}{k}.") for k, v in messages.items())
    if isinstance(messages, list):
        return f"{prefix.rstrip('.')}: " + " ".join(str(m) for m in messages)
    return f"{prefix.rstrip('.')}: {messages}"
