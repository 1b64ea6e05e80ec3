"""Database URLs: parse one, check its driver module is installed, build the peewee database.

Supported schemes (peewee ``db_url`` style):

* ``sqlite:///relative/tasks.db`` and ``sqlite:////absolute/tasks.db``
* ``postgresql://user[:password]@host[:port]/dbname`` (``postgres://`` too), driver psycopg2
  (or psycopg 3), extra ``postgres``
* ``mysql://user[:password]@host[:port]/dbname`` (MySQL 8 or MariaDB 10.6+), driver pymysql,
  extra ``mysql``

Query-string parameters are passed to the driver (``?sslmode=require``). Building the peewee
object does no I/O; connections are opened lazily by the pool.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import peewee as pw
from playhouse import db_url
from playhouse.pool import PooledMySQLDatabase, PooledPostgresqlDatabase, PooledSqliteDatabase

from wpk_upgrade.errors import PluginError

from .options import SqlStoreOptions

SQLITE = "sqlite"
POSTGRESQL = "postgresql"
MYSQL = "mysql"

_DIALECTS = {"sqlite": SQLITE, "postgresql": POSTGRESQL, "postgres": POSTGRESQL, "mysql": MYSQL}

#: dialect -> (importable driver modules, any one is enough; the extra that installs one)
_DRIVERS: dict[str, tuple[tuple[str, ...], str]] = {
    POSTGRESQL: (("psycopg2", "psycopg"), "postgres"),
    MYSQL: (("pymysql",), "mysql"),
}


@dataclass(frozen=True)
class DbTarget:
    """A parsed database URL. ``display`` is the URL with any password masked."""

    dialect: str
    database: str
    params: dict[str, Any] = field(default_factory=dict)
    display: str = ""


def redact(url: str) -> str:
    """The URL with its password replaced by ``***`` (safe to log or show)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable database URL>"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username or ''}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def parse(url: str) -> DbTarget:
    """Parse a store URL; ``PluginError`` for an unsupported scheme or a missing database."""
    display = redact(url)
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as exc:
        raise PluginError(f"invalid task store URL {display!r}: {exc}") from None
    dialect = _DIALECTS.get(scheme)
    if dialect is None:
        known = ", ".join(f"{s}://" for s in sorted(_DIALECTS))
        raise PluginError(
            f"unsupported task store URL scheme {scheme!r} in {display!r} (supported: {known})"
        )
    try:
        params = db_url.parse(url, unquote_password=True, unquote_user=True)
    except ValueError as exc:
        raise PluginError(f"invalid task store URL {display!r}: {exc}") from None
    database = params.pop("database", "") or ""
    if "passwd" in params:  # db_url's MySQLdb spelling; pymysql wants ``password``
        params["password"] = params.pop("passwd")
    if not database or (dialect == SQLITE and database == ":memory:"):
        raise PluginError(
            f"task store URL {display!r} names no database file or database "
            "(SQLite: sqlite:////absolute/path/tasks.db; servers: scheme://user@host/dbname)"
        )
    return DbTarget(dialect=dialect, database=database, params=params, display=display)


def require_driver(target: DbTarget) -> None:
    """``PluginError`` naming the extra to install when the dialect's driver is missing."""
    spec = _DRIVERS.get(target.dialect)
    if spec is None:
        return
    modules, extra = spec
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        return
    raise PluginError(
        f"the {target.dialect} task store needs the {modules[0]} driver, which is not "
        f"installed: pip install 'wpk-upgrade[{extra}]'"
    )


def build_database(target: DbTarget, options: SqlStoreOptions) -> pw.Database:
    """A pooled peewee database for ``target`` (no I/O here)."""
    pool: dict[str, Any] = {
        "max_connections": options.max_connections,
        "timeout": options.busy_timeout,  # pool: wait for a free connection (SQLite's own
        # busy timeout is the busy_timeout pragma below)
        "stale_timeout": 3600,
    }
    if target.dialect == SQLITE:
        busy_ms = int(options.busy_timeout * 1000)
        return PooledSqliteDatabase(
            target.database,
            pragmas=[
                ("journal_mode", "wal"),
                ("busy_timeout", busy_ms),
                ("foreign_keys", 1),
                ("synchronous", "normal"),
            ],
            check_same_thread=False,  # pooled connections move between threads
            **pool,
            **target.params,
        )
    if target.dialect == POSTGRESQL:
        params = {"connect_timeout": max(1, int(options.connect_timeout)), **target.params}
        return PooledPostgresqlDatabase(target.database, **pool, **params)
    from pymysql.constants import CLIENT

    params = {
        "connect_timeout": options.connect_timeout,
        # READ COMMITTED: a statement sees what other transactions committed before it, as
        # on PostgreSQL, so re-reads after a lock wait are fresh; fewer gap-lock deadlocks.
        "init_command": "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
        "client_flag": CLIENT.FOUND_ROWS,  # UPDATE row counts are matched rows
        **target.params,
    }
    return PooledMySQLDatabase(target.database, **pool, **params)
