"""WPK sources on the local file system (entry points ``file`` and ``custom``).

``FileRepositorySource`` serves ``file:///srv/wpk/`` mirrors with the reference layout and
``versions`` files (air-gapped sites); ``CustomFileSource`` serves the single local WPK of an
``upgrade_custom`` request, with the path rules of the reference API.
"""

from .source import (
    CustomFileSource,
    CustomSourceConfig,
    CustomSourceConfigSchema,
    FileRepositorySource,
    path_from_file_url,
)

__all__ = [
    "CustomFileSource",
    "CustomSourceConfig",
    "CustomSourceConfigSchema",
    "FileRepositorySource",
    "path_from_file_url",
]
