"""Options of the SQL task store (the ``[store.options]`` table) and their marshmallow schema."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from marshmallow import Schema, fields, post_load, validate


@dataclass(frozen=True)
class SqlStoreOptions:
    """Tuning knobs; the defaults suit one manager node with a few worker threads.

    ``max_connections``: connections the store's pool may hold (one per busy thread).
    ``busy_timeout``: seconds a SQLite writer waits for the file lock; also the pool wait.
    ``connect_timeout``: seconds to wait for a PostgreSQL/MariaDB server to answer.
    ``retries``: how often a transaction is replayed after a deadlock or serialization failure.
    """

    max_connections: int = 32
    busy_timeout: float = 30.0
    connect_timeout: float = 10.0
    retries: int = 5


class SqlStoreOptionsSchema(Schema):
    """Validates ``[store.options]``; ``load`` returns a ``SqlStoreOptions``."""

    max_connections = fields.Integer(load_default=32, validate=validate.Range(1, 1024))
    busy_timeout = fields.Float(load_default=30.0, validate=validate.Range(min=0.1))
    connect_timeout = fields.Float(load_default=10.0, validate=validate.Range(min=0.1))
    retries = fields.Integer(load_default=5, validate=validate.Range(0, 100))

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> SqlStoreOptions:
        return SqlStoreOptions(**data)


def coerce_options(config: Any) -> SqlStoreOptions:
    """Accept what a caller may pass as ``config``: None, a ``SqlStoreOptions`` or a dict."""
    if config is None:
        return SqlStoreOptions()
    if isinstance(config, SqlStoreOptions):
        return config
    if isinstance(config, dict):
        loaded: SqlStoreOptions = SqlStoreOptionsSchema().load(config)
        return loaded
    raise TypeError(f"SQL store options must be a dict or SqlStoreOptions, not {type(config)}")
