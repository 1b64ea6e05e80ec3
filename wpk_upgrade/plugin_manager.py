"""The plugin-manager factory: one pluggy manager per process, never built at import time."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import pluggy

from . import hookspecs

log = logging.getLogger(__name__)

HOOK_GROUP = "wpk_upgrade.hooks"


def make_plugin_manager(
    extra_plugins: Iterable[object] = (), load_entry_points: bool = True
) -> pluggy.PluginManager:
    """Build a plugin manager with the hook specs, every ``wpk_upgrade.hooks`` entry point
    (when ``load_entry_points``) and ``extra_plugins`` (objects or modules with hookimpls)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if load_entry_points:
        pm.load_setuptools_entrypoints(HOOK_GROUP)
    for plugin in extra_plugins:
        pm.register(plugin)
    return pm


def notify(pm: pluggy.PluginManager, hook_name: str, **kwargs: object) -> None:
    """Call a notification hook; a failing implementation is logged and ignored."""
    hook = getattr(pm.hook, hook_name)
    for impl in reversed(hook.get_hookimpls()):
        try:
            impl.function(**{k: kwargs[k] for k in impl.argnames if k in kwargs})
        except Exception:
            log.exception("hook %s of plugin %s failed", hook_name, impl.plugin_name)
