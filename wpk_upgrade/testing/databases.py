"""Throw-away PostgreSQL and MariaDB/MySQL databases for tests and CI.

Finds the server (``WPK_TEST_POSTGRES_URL`` / ``WPK_TEST_MYSQL_URL`` admin URLs, else the local
defaults below), starts a locally installed server that is down (Debian's ``pg_ctlcluster``,
``mariadbd`` through ``start-stop-daemon``) and waits until it accepts connections, then
creates uniquely named databases and drops them afterwards.

``ServerNotInstalled`` means "no such server on this machine at all" (tests skip);
``ServerUnavailable`` means "installed or configured, but not answering" (tests fail).
Nothing here needs pytest except ``server_or_skip``. Driver modules (psycopg2, pymysql) are
imported only when used.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

POSTGRESQL = "postgresql"
MYSQL = "mysql"

POSTGRES_URL_ENV = "WPK_TEST_POSTGRES_URL"
MYSQL_URL_ENV = "WPK_TEST_MYSQL_URL"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_MYSQL_URL = "mysql://root@127.0.0.1:3306/mysql"
START_TIMEOUT = 30.0

_NAME_RE = re.compile(r"^[a-z0-9_]+$")


class ServerNotInstalled(RuntimeError):
    """No server of this kind is configured or installed here: tests should skip."""


class ServerUnavailable(RuntimeError):
    """A server is configured or installed but does not accept connections."""


@dataclass(frozen=True)
class Server:
    """A reachable database server and the admin URL used to create databases on it."""

    kind: str
    admin_url: str

    def url_for(self, database: str) -> str:
        """The admin URL with its database replaced by ``database``."""
        parts = urlsplit(self.admin_url)
        return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, ""))


# ---------------------------------------------------------------------- connecting


def _connect_args(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    args: dict[str, Any] = {
        "host": parts.hostname or "127.0.0.1",
        "user": unquote(parts.username) if parts.username else None,
        "database": parts.path.lstrip("/") or None,
    }
    if parts.port:
        args["port"] = parts.port
    if parts.password is not None:
        args["password"] = unquote(parts.password)
    return {k: v for k, v in args.items() if v is not None}


def connect(url: str, timeout: float = 5.0) -> Any:
    """A raw DB-API connection (autocommit) to ``url`` (``postgresql://`` or ``mysql://``)."""
    kind = _kind(url)
    args = _connect_args(url)
    if kind == POSTGRESQL:
        import psycopg2

        args["dbname"] = args.pop("database", "postgres")
        conn = psycopg2.connect(connect_timeout=max(1, int(timeout)), **args)
        conn.autocommit = True
        return conn
    import pymysql

    return pymysql.connect(connect_timeout=timeout, autocommit=True, **args)


def _kind(url: str) -> str:
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("postgresql", "postgres"):
        return POSTGRESQL
    if scheme == "mysql":
        return MYSQL
    raise ValueError(f"not a PostgreSQL or MySQL URL: {scheme}://...")


def reachable(url: str, timeout: float = 2.0) -> bool:
    """True when a connection to ``url`` can be opened."""
    try:
        connect(url, timeout).close()
    except Exception:  # noqa: BLE001 - any driver error means "not now"
        return False
    return True


# ---------------------------------------------------------------------- finding / starting


def _postgres_start_commands() -> list[list[str]]:
    tool = shutil.which("pg_ctlcluster")
    conf = Path("/etc/postgresql")
    if tool is None or not conf.is_dir():
        return []
    return [
        [tool, "--skip-systemctl-redirect", version.name, "main", "start"]
        for version in sorted(conf.iterdir())
        if (version / "main").is_dir()
    ]


def _mysql_start_commands() -> list[list[str]]:
    daemon = shutil.which("mariadbd") or next(
        (p for p in ("/usr/sbin/mariadbd", "/usr/sbin/mysqld") if os.path.exists(p)), None
    )
    if daemon is None:
        return []
    ssd = shutil.which("start-stop-daemon")
    if ssd is None:
        return [[daemon]]
    return [[ssd, "--start", "--oknodo", "--background", "--exec", daemon]]


def _prepare_mysql_run_dir() -> None:
    """mariadbd needs /run/mysqld for its socket and pid file (normally made by systemd)."""
    run = Path("/run/mysqld")
    if run.exists() or os.geteuid() != 0:
        return
    run.mkdir(mode=0o755, parents=True)
    try:
        shutil.chown(run, "mysql", "mysql")
    except (LookupError, OSError):
        pass


def _start(kind: str, commands: list[list[str]]) -> None:
    if kind == MYSQL:
        _prepare_mysql_run_dir()
    for command in commands:
        if command[0].endswith(("mariadbd", "mysqld")):
            subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            continue
        # A cluster that is already running makes pg_ctlcluster exit 2: harmless.
        subprocess.run(command, capture_output=True, timeout=60, check=False)


def find_server(kind: str, timeout: float = START_TIMEOUT) -> Server:
    """A reachable server of ``kind`` (``postgresql`` or ``mysql``), started if needed.

    The URL comes from the environment variable when set (CI service containers), else the
    local default. Raises ``ServerNotInstalled`` or ``ServerUnavailable``.
    """
    env, default = (
        (POSTGRES_URL_ENV, DEFAULT_POSTGRES_URL)
        if kind == POSTGRESQL
        else (MYSQL_URL_ENV, DEFAULT_MYSQL_URL)
    )
    label = "PostgreSQL" if kind == POSTGRESQL else "MariaDB/MySQL"
    url = os.environ.get(env) or default
    if reachable(url):
        return Server(kind, url)
    commands = _postgres_start_commands() if kind == POSTGRESQL else _mysql_start_commands()
    if not commands:
        if os.environ.get(env):
            raise ServerUnavailable(f"{label} at ${env} does not accept connections")
        raise ServerNotInstalled(
            f"no {label} server here (not reachable at the default address, not installed; "
            f"set {env} to use one)"
        )
    _start(kind, commands)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reachable(url):
            return Server(kind, url)
        time.sleep(0.5)
    raise ServerUnavailable(
        f"{label} is installed but did not accept connections within "
        f"{timeout:.0f} s after starting it"
    )


def server_or_skip(kind: str) -> Server:
    """``find_server`` for pytest: skip only when no such server is installed at all."""
    import pytest

    try:
        return find_server(kind)
    except ServerNotInstalled as exc:
        pytest.skip(str(exc))
        raise  # pragma: no cover - pytest.skip raises


# ---------------------------------------------------------------------- databases


def unique_name(prefix: str = "wpk_test") -> str:
    """A database name unlikely to collide: prefix, process id, random suffix."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}".lower()
    if not _NAME_RE.match(name):
        raise ValueError(f"database name prefix must be [a-z0-9_]: {prefix!r}")
    return name


def create_database(server: Server, prefix: str = "wpk_test") -> str:
    """Create an empty uniquely named database; returns its URL."""
    name = unique_name(prefix)
    conn = connect(server.admin_url)
    try:
        with conn.cursor() as cur:
            if server.kind == POSTGRESQL:
                cur.execute(f'CREATE DATABASE "{name}"')
            else:
                cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    finally:
        conn.close()
    return server.url_for(name)


def drop_database(server: Server, url: str) -> None:
    """Drop the database of ``url`` (closing other sessions on it first)."""
    name = urlsplit(url).path.lstrip("/")
    if not _NAME_RE.match(name):
        raise ValueError(f"refusing to drop database with unexpected name {name!r}")
    conn = connect(server.admin_url)
    try:
        with conn.cursor() as cur:
            if server.kind == POSTGRESQL:
                if conn.server_version >= 130000:
                    cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                else:
                    cur.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = %s AND pid <> pg_backend_pid()",
                        (name,),
                    )
                    cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
            else:
                cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    finally:
        conn.close()


@contextmanager
def temporary_database(server: Server, prefix: str = "wpk_test") -> Iterator[str]:
    """Create a database, yield its URL, drop it afterwards."""
    url = create_database(server, prefix)
    try:
        yield url
    finally:
        drop_database(server, url)


def terminate_connections(server: Server, url: str) -> int:
    """Kill every session connected to the database of ``url`` (as a server restart would).

    Returns how many were killed.
    """
    name = urlsplit(url).path.lstrip("/")
    conn = connect(server.admin_url)
    try:
        with conn.cursor() as cur:
            if server.kind == POSTGRESQL:
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
                return len(cur.fetchall())
            cur.execute(
                "SELECT id FROM information_schema.processlist "
                "WHERE db = %s AND id <> CONNECTION_ID()",
                (name,),
            )
            ids = [row[0] for row in cur.fetchall()]
            for session in ids:
                try:
                    cur.execute(f"KILL {int(session)}")
                except Exception:  # noqa: BLE001 - it may have ended meanwhile
                    pass
            return len(ids)
    finally:
        conn.close()


def drop_stale_databases(server: Server, prefix: str = "wpk_test") -> list[str]:
    """Drop databases named by ``unique_name(prefix)`` whose creating process is gone."""
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d+)_[0-9a-f]{{8}}$")
    conn = connect(server.admin_url)
    try:
        with conn.cursor() as cur:
            if server.kind == POSTGRESQL:
                cur.execute("SELECT datname FROM pg_database")
            else:
                cur.execute("SHOW DATABASES")
            names = [row[0] for row in cur.fetchall()]
    finally:
        conn.close()
    dropped = []
    for name in names:
        match = pattern.match(name)
        if match and not _pid_alive(int(match.group(1))):
            drop_database(server, server.url_for(name))
            dropped.append(name)
    return dropped


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def truncate_tables(url: str, keep: tuple[str, ...] = ("metadata",)) -> None:
    """Empty every table of the database at ``url`` except ``keep``; ids restart at 1.

    Works on ``postgresql://``, ``mysql://`` and ``sqlite:///`` URLs. Faster than dropping
    and re-creating a database between tests.
    """
    if url.startswith("sqlite:"):
        _truncate_sqlite(url, keep)
        return
    kind = _kind(url)
    conn = connect(url)
    try:
        with conn.cursor() as cur:
            if kind == POSTGRESQL:
                cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
                tables = [r[0] for r in cur.fetchall() if r[0] not in keep]
                if tables:
                    listed = ", ".join(f'"{t}"' for t in tables)
                    cur.execute(f"TRUNCATE TABLE {listed} RESTART IDENTITY CASCADE")
            else:
                cur.execute("SHOW TABLES")
                tables = [r[0] for r in cur.fetchall() if r[0] not in keep]
                cur.execute("SET FOREIGN_KEY_CHECKS = 0")
                for table in tables:
                    cur.execute(f"TRUNCATE TABLE `{table}`")
                cur.execute("SET FOREIGN_KEY_CHECKS = 1")
    finally:
        conn.close()


def _truncate_sqlite(url: str, keep: tuple[str, ...]) -> None:
    import sqlite3

    path = urlsplit(url).path[1:]
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        names = [r[0] for r in rows]
        for name in names:
            if name not in keep and not name.startswith("sqlite_"):
                conn.execute(f'DELETE FROM "{name}"')
        if "sqlite_sequence" in names:
            conn.execute("DELETE FROM sqlite_sequence")
    finally:
        conn.close()
