"""Versioned schema migrations of the SQL task store, one DDL script per dialect.

``metadata(name, value)`` holds ``schema_version``; ``migrate`` brings a database from its
version (0 when the table or the row is missing) to ``SCHEMA_VERSION``, one step at a time,
and refuses a database written by a newer release. Concurrent ``open()`` calls of several
processes are serialized: SQLite ``BEGIN IMMEDIATE``, PostgreSQL a transaction-level
advisory lock, MySQL/MariaDB ``GET_LOCK`` (whose DDL commits implicitly, so each statement
is written to be re-runnable: ``IF NOT EXISTS`` everywhere).

To add version N: append ``N: {dialect: [statements]}`` to ``MIGRATIONS``; never edit a
released step.

Schema v1::

    tasks        task_id PK auto, agent_id, node, module, command, status, create_time,
                 update_time NULL, error_msg NULL, params NULL (TaskParams JSON),
                 bytes_sent, bytes_total
                 idx (agent_id, create_time, task_id)   latest task per agent
                 idx (status, update_time)              timeout sweep
                 idx (node, status, create_time, task_id) pending/claim per node
                 idx (create_time)                      cleanup, listing by time
    task_history id PK auto, task_id, from_status NULL, to_status, change_time, node,
                 reason NULL, extra NULL (JSON); kept when its task is deleted; also
                 holds phase rows (from = to = In progress, extra {"phase": ...}),
                 which ``history()`` leaves out
                 idx (task_id, id), idx (change_time)
    agents       agent_id PK, name, version, os_platform, os_major, os_minor, os_arch,
                 connection_status, node, last_seen;  idx (node, connection_status)
    agent_locks  agent_id PK: rows locked FOR UPDATE to serialize per-agent intake
    metadata     name PK, value
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import peewee as pw

from wpk_upgrade.errors import PluginError

from .urls import MYSQL, POSTGRESQL, SQLITE

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
VERSION_KEY = "schema_version"
_PG_LOCK_KEY = 0x77706B75  # "wpku"
_MYSQL_LOCK_NAME = "wpk_upgrade_schema"

_METADATA = {
    SQLITE: "CREATE TABLE IF NOT EXISTS metadata (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    POSTGRESQL: (
        "CREATE TABLE IF NOT EXISTS metadata (name VARCHAR(64) PRIMARY KEY, value TEXT NOT NULL)"
    ),
    MYSQL: (
        "CREATE TABLE IF NOT EXISTS metadata (name VARCHAR(64) NOT NULL PRIMARY KEY, "
        "value VARCHAR(255) NOT NULL) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
    ),
}

_V1_SQLITE = [
    """CREATE TABLE IF NOT EXISTS tasks (
        task_id INTEGER PRIMARY KEY AUTOINCREMENT,
        agent_id INTEGER NOT NULL,
        node TEXT NOT NULL,
        module TEXT NOT NULL,
        command TEXT NOT NULL,
        status TEXT NOT NULL,
        create_time INTEGER NOT NULL,
        update_time INTEGER,
        error_msg TEXT,
        params TEXT,
        bytes_sent INTEGER NOT NULL DEFAULT 0,
        bytes_total INTEGER NOT NULL DEFAULT 0)""",
    "CREATE INDEX IF NOT EXISTS tasks_agent_latest ON tasks (agent_id, create_time, task_id)",
    "CREATE INDEX IF NOT EXISTS tasks_status_update ON tasks (status, update_time)",
    "CREATE INDEX IF NOT EXISTS tasks_node_status ON tasks (node, status, create_time, task_id)",
    "CREATE INDEX IF NOT EXISTS tasks_create_time ON tasks (create_time)",
    """CREATE TABLE IF NOT EXISTS task_history (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        task_id INTEGER NOT NULL,
        from_status TEXT,
        to_status TEXT NOT NULL,
        change_time INTEGER NOT NULL,
        node TEXT NOT NULL,
        reason TEXT,
        extra TEXT)""",
    "CREATE INDEX IF NOT EXISTS task_history_task ON task_history (task_id, id)",
    "CREATE INDEX IF NOT EXISTS task_history_time ON task_history (change_time)",
    """CREATE TABLE IF NOT EXISTS agents (
        agent_id INTEGER PRIMARY KEY,
        name TEXT NOT NULL DEFAULT '',
        version TEXT,
        os_platform TEXT,
        os_major TEXT,
        os_minor TEXT,
        os_arch TEXT,
        connection_status TEXT NOT NULL DEFAULT 'never_connected',
        node TEXT NOT NULL DEFAULT '',
        last_seen INTEGER)""",
    "CREATE INDEX IF NOT EXISTS agents_node_conn ON agents (node, connection_status)",
    "CREATE TABLE IF NOT EXISTS agent_locks (agent_id INTEGER PRIMARY KEY)",
]

_V1_POSTGRESQL = [
    """CREATE TABLE IF NOT EXISTS tasks (
        task_id BIGSERIAL PRIMARY KEY,
        agent_id INTEGER NOT NULL,
        node TEXT NOT NULL,
        module TEXT NOT NULL,
        command TEXT NOT NULL,
        status TEXT NOT NULL,
        create_time BIGINT NOT NULL,
        update_time BIGINT,
        error_msg TEXT,
        params TEXT,
        bytes_sent BIGINT NOT NULL DEFAULT 0,
        bytes_total BIGINT NOT NULL DEFAULT 0)""",
    "CREATE INDEX IF NOT EXISTS tasks_agent_latest ON tasks (agent_id, create_time, task_id)",
    "CREATE INDEX IF NOT EXISTS tasks_status_update ON tasks (status, update_time)",
    "CREATE INDEX IF NOT EXISTS tasks_node_status ON tasks (node, status, create_time, task_id)",
    "CREATE INDEX IF NOT EXISTS tasks_create_time ON tasks (create_time)",
    """CREATE TABLE IF NOT EXISTS task_history (
        id BIGSERIAL PRIMARY KEY,
        task_id BIGINT NOT NULL,
        from_status TEXT,
        to_status TEXT NOT NULL,
        change_time BIGINT NOT NULL,
        node TEXT NOT NULL,
        reason TEXT,
        extra TEXT)""",
    "CREATE INDEX IF NOT EXISTS task_history_task ON task_history (task_id, id)",
    "CREATE INDEX IF NOT EXISTS task_history_time ON task_history (change_time)",
    """CREATE TABLE IF NOT EXISTS agents (
        agent_id INTEGER PRIMARY KEY,
        name TEXT NOT NULL DEFAULT '',
        version TEXT,
        os_platform TEXT,
        os_major TEXT,
        os_minor TEXT,
        os_arch TEXT,
        connection_status TEXT NOT NULL DEFAULT 'never_connected',
        node TEXT NOT NULL DEFAULT '',
        last_seen BIGINT)""",
    "CREATE INDEX IF NOT EXISTS agents_node_conn ON agents (node, connection_status)",
    "CREATE TABLE IF NOT EXISTS agent_locks (agent_id INTEGER PRIMARY KEY)",
]

_MYSQL_TABLE = " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
_V1_MYSQL = [
    """CREATE TABLE IF NOT EXISTS tasks (
        task_id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        agent_id INTEGER NOT NULL,
        node VARCHAR(255) NOT NULL,
        module VARCHAR(64) NOT NULL,
        command VARCHAR(64) NOT NULL,
        status VARCHAR(32) NOT NULL,
        create_time BIGINT NOT NULL,
        update_time BIGINT NULL,
        error_msg TEXT NULL,
        params TEXT NULL,
        bytes_sent BIGINT NOT NULL DEFAULT 0,
        bytes_total BIGINT NOT NULL DEFAULT 0,
        INDEX tasks_agent_latest (agent_id, create_time, task_id),
        INDEX tasks_status_update (status, update_time),
        INDEX tasks_node_status (node, status, create_time, task_id),
        INDEX tasks_create_time (create_time))"""
    + _MYSQL_TABLE,
    """CREATE TABLE IF NOT EXISTS task_history (
        id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
        task_id BIGINT NOT NULL,
        from_status VARCHAR(32) NULL,
        to_status VARCHAR(32) NOT NULL,
        change_time BIGINT NOT NULL,
        node VARCHAR(255) NOT NULL,
        reason TEXT NULL,
        extra TEXT NULL,
        INDEX task_history_task (task_id, id),
        INDEX task_history_time (change_time))"""
    + _MYSQL_TABLE,
    """CREATE TABLE IF NOT EXISTS agents (
        agent_id INTEGER NOT NULL PRIMARY KEY,
        name VARCHAR(255) NOT NULL DEFAULT '',
        version VARCHAR(64) NULL,
        os_platform VARCHAR(64) NULL,
        os_major VARCHAR(32) NULL,
        os_minor VARCHAR(32) NULL,
        os_arch VARCHAR(32) NULL,
        connection_status VARCHAR(32) NOT NULL DEFAULT 'never_connected',
        node VARCHAR(255) NOT NULL DEFAULT '',
        last_seen BIGINT NULL,
        INDEX agents_node_conn (node, connection_status))"""
    + _MYSQL_TABLE,
    "CREATE TABLE IF NOT EXISTS agent_locks (agent_id INTEGER NOT NULL PRIMARY KEY)" + _MYSQL_TABLE,
]

#: version -> dialect -> statements that bring the previous version to this one.
MIGRATIONS: dict[int, dict[str, list[str]]] = {
    1: {SQLITE: _V1_SQLITE, POSTGRESQL: _V1_POSTGRESQL, MYSQL: _V1_MYSQL},
}


def current_version(db: pw.Database) -> int:
    """The recorded schema version; 0 when ``metadata`` or its row is missing."""
    if "metadata" not in db.get_tables():
        return 0
    row = db.execute_sql(
        f"SELECT value FROM metadata WHERE name = {db.param}", (VERSION_KEY,)
    ).fetchone()
    return int(row[0]) if row else 0


def migrate(db: pw.Database, dialect: str, display: str) -> tuple[int, int]:
    """Create or upgrade the schema; returns (version found, version now).

    ``PluginError`` when the database was written by a newer schema than this code knows.
    """
    with _migration_lock(db, dialect):
        db.execute_sql(_METADATA[dialect])
        found = current_version(db)
        if found > SCHEMA_VERSION:
            raise PluginError(
                f"task store {display} has schema version {found}, newer than the "
                f"{SCHEMA_VERSION} this wpk-upgrade understands; upgrade wpk-upgrade"
            )
        for version in range(found + 1, SCHEMA_VERSION + 1):
            log.info("task store %s: migrating schema to version %d", display, version)
            for statement in MIGRATIONS[version][dialect]:
                db.execute_sql(statement)
            _set_version(db, version)
        return found, SCHEMA_VERSION


def _set_version(db: pw.Database, version: int) -> None:
    p = db.param
    cursor = db.execute_sql(
        f"UPDATE metadata SET value = {p} WHERE name = {p}", (str(version), VERSION_KEY)
    )
    if cursor.rowcount == 0:
        db.execute_sql(
            f"INSERT INTO metadata (name, value) VALUES ({p}, {p})", (VERSION_KEY, str(version))
        )


@contextmanager
def _migration_lock(db: pw.Database, dialect: str) -> Iterator[None]:
    if dialect == SQLITE:
        with db.atomic("IMMEDIATE"):
            yield
    elif dialect == POSTGRESQL:
        with db.atomic():
            db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (_PG_LOCK_KEY,))
            yield
    else:
        row = db.execute_sql("SELECT GET_LOCK(%s, 60)", (_MYSQL_LOCK_NAME,)).fetchone()
        if not row or row[0] != 1:
            raise PluginError("timed out waiting for another process to migrate the task store")
        try:
            yield
        finally:
            db.execute_sql("SELECT RELEASE_LOCK(%s)", (_MYSQL_LOCK_NAME,))
