"""wpk-source-manifest: a third-party WPK source for wpk-upgrade (an example to copy).

Repositories named ``manifest+https://host/path/manifest.json`` are JSON release manifests
(format in ``manifest``); ``ManifestSource`` resolves versions from them and streams the WPKs
they list over HTTP(S). The plugin is registered only by the entry points
``manifest+https`` / ``manifest+http`` in the group ``wpk_upgrade.sources``.
"""

from .manifest import (
    AgentTarget,
    Manifest,
    ManifestError,
    Release,
    WpkEntry,
    agent_target,
    parse,
)
from .source import ManifestSource, ManifestSourceConfig, ManifestSourceConfigSchema, manifest_url

__all__ = [
    "AgentTarget",
    "Manifest",
    "ManifestError",
    "ManifestSource",
    "ManifestSourceConfig",
    "ManifestSourceConfigSchema",
    "Release",
    "WpkEntry",
    "agent_target",
    "manifest_url",
    "parse",
]
