"""WPK source for ``https://`` and ``http://`` repositories (entry points ``https``, ``http``).

Standard library only (urllib + ssl): CA bundle or system CAs, redirects without https->http
downgrade, proxies from the environment (or the ``proxy`` option), resumable streamed
downloads with ``Range``, retries with backoff for transient failures.
"""

from .source import HttpRepositorySource, HttpSourceConfig, HttpSourceConfigSchema

__all__ = ["HttpRepositorySource", "HttpSourceConfig", "HttpSourceConfigSchema"]
