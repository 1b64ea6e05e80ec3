"""SQL task store on SQLite: the store contract, SQLite specifics, URLs and errors, scale.

PostgreSQL and MariaDB run the same contract in ``test_store_databases.py``.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from wpk_store_sql import SqlStoreOptions, SqlTaskStore
from wpk_store_sql.migrations import SCHEMA_VERSION

from wpk_upgrade.drivers import STORES, driver_class, load_options
from wpk_upgrade.errors import PluginError, TaskCode, TaskError
from wpk_upgrade.interfaces import TaskStore
from wpk_upgrade.models import Task, TaskStatus
from wpk_upgrade.testing.store_contract import (
    CrossProcessContract,
    StoreSpec,
    TaskStoreContract,
    create,
)

FACTORY = "wpk_store_sql:SqlTaskStore"


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"  # path is absolute: four slashes in all


class TestSqliteStoreContract(TaskStoreContract, CrossProcessContract):
    @pytest.fixture
    def db_path(self, tmp_path: Path) -> Path:
        return tmp_path / "queue" / "tasks" / "tasks.db"

    @pytest.fixture
    def store(self, db_path: Path) -> Iterator[TaskStore]:
        store = SqlTaskStore(sqlite_url(db_path))
        store.open()
        yield store
        store.close()

    @pytest.fixture
    def store_spec(self, db_path: Path) -> StoreSpec:
        return StoreSpec(FACTORY, sqlite_url(db_path))


# ---------------------------------------------------------------------- SQLite specifics


def test_file_parents_mode_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "tasks.db"
    store = SqlTaskStore(sqlite_url(path))
    assert not path.parent.exists()  # no I/O before open()
    store.open()
    try:
        assert path.is_file()
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        create(store, [1])
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute(
                "SELECT value FROM metadata WHERE name = 'schema_version'"
            ).fetchone()[0] == str(SCHEMA_VERSION)
        finally:
            conn.close()
    finally:
        store.close()


def test_connection_pragmas(tmp_path: Path) -> None:
    store = SqlTaskStore(sqlite_url(tmp_path / "t.db"), {"busy_timeout": 7})
    store.open()
    try:
        db = store._db
        assert db is not None
        assert db.execute_sql("PRAGMA busy_timeout").fetchone()[0] == 7000
        assert db.execute_sql("PRAGMA foreign_keys").fetchone()[0] == 1
        db.close()
    finally:
        store.close()


def test_relative_path_is_relative_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = SqlTaskStore("sqlite:///rel/tasks.db")
    store.open()
    store.close()
    assert (tmp_path / "rel" / "tasks.db").is_file()


def test_migrates_from_empty_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE metadata (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.commit()
    conn.close()
    store = SqlTaskStore(sqlite_url(path))
    store.open()
    try:
        assert [t.task_id for t in create(store, [1, 2])] == [1, 2]
    finally:
        store.close()
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    version = conn.execute("SELECT value FROM metadata").fetchall()
    conn.close()
    assert {"tasks", "task_history", "agents", "agent_locks", "metadata"} <= tables
    assert version == [(str(SCHEMA_VERSION),)]


def test_reopen_is_idempotent(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "tasks.db")
    for round_ in range(3):
        store = SqlTaskStore(url)
        store.open()
        create(store, [round_])
        store.close()
    store = SqlTaskStore(url)
    store.open()
    try:
        assert sorted(store.latest_tasks([0, 1, 2])) == [0, 1, 2]
    finally:
        store.close()
    conn = sqlite3.connect(tmp_path / "tasks.db")
    assert conn.execute("SELECT COUNT(*) FROM metadata").fetchone()[0] == 1
    conn.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE metadata (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("INSERT INTO metadata VALUES ('schema_version', '999')")
    conn.commit()
    conn.close()
    with pytest.raises(PluginError, match="schema version 999"):
        SqlTaskStore(sqlite_url(path)).open()


def test_unwritable_location(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PluginError, match="cannot create task store file"):
        SqlTaskStore(sqlite_url(blocker / "tasks.db")).open()


def test_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "tasks.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(PluginError, match="cannot open task store"):
        SqlTaskStore(sqlite_url(path)).open()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_file_removed_while_open_is_refused(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The SQLite file deleted (or swapped for another) under a running store: every
    operation is refused with a database error naming the file, logged once, instead of
    acknowledging writes to a file nobody will read again."""
    path = tmp_path / "tasks.db"
    store = SqlTaskStore(sqlite_url(path))
    store.open()
    try:
        [task] = create(store, [1])
        os.unlink(path)
        if how == "replaced":
            path.write_bytes(b"")
        for _ in range(3):
            with pytest.raises(TaskError) as err:
                create(store, [2])
            assert err.value.code == TaskCode.DATABASE_ERROR
            assert "removed or replaced while open" in err.value.detail
            with pytest.raises(TaskError):
                store.get_task(task.task_id)
        assert caplog.text.count("removed or replaced while open") == 1
    finally:
        store.close()


def test_not_open_is_a_database_error(tmp_path: Path) -> None:
    store = SqlTaskStore(sqlite_url(tmp_path / "t.db"))
    with pytest.raises(TaskError) as err:
        store.get_task(1)
    assert err.value.code == TaskCode.DATABASE_ERROR
    store.open()
    store.close()
    store.close()
    with pytest.raises(TaskError):
        create(store, [1])


def test_query_failure_is_a_database_error(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    store = SqlTaskStore(sqlite_url(path))
    store.open()
    try:
        conn = sqlite3.connect(path)
        conn.execute("DROP TABLE task_history")
        conn.commit()
        conn.close()
        with pytest.raises(TaskError) as err:
            create(store, [1])
        assert err.value.code == TaskCode.DATABASE_ERROR
        assert "task_history" in err.value.detail
        assert store.latest_tasks([1]) == {}  # rolled back with the history insert
    finally:
        store.close()


def test_locked_writer_waits_for_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    store = SqlTaskStore(sqlite_url(path), SqlStoreOptions(busy_timeout=0.3, retries=0))
    store.open()
    try:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(TaskError, match="locked"):
            create(store, [1])
        assert time.monotonic() - started >= 0.25
        conn.execute("ROLLBACK")
        conn.close()
        assert len(create(store, [1])) == 1
    finally:
        store.close()


# ---------------------------------------------------------------------- URLs, drivers, options


def test_entry_points_load_the_store() -> None:
    for name in ("sqlite", "postgresql", "mysql"):
        assert driver_class(STORES, name) is SqlTaskStore
    assert SqlTaskStore.name == "sql"


def test_options_schema() -> None:
    opts = load_options(SqlTaskStore, {"max_connections": 4, "retries": 1}, "store")
    assert opts == SqlStoreOptions(max_connections=4, retries=1)
    with pytest.raises(PluginError):
        load_options(SqlTaskStore, {"max_connections": 0}, "store")
    with pytest.raises(PluginError, match="invalid SQL task store options"):
        SqlTaskStore("sqlite:////tmp/x.db", {"nope": 1})


@pytest.mark.parametrize(
    "url",
    ["oracle://u@h/db", "sqlite3:///x.db", "http://example.com/db", "tasks.db"],
)
def test_unsupported_scheme(url: str) -> None:
    with pytest.raises(PluginError, match="unsupported task store URL scheme"):
        SqlTaskStore(url)


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "postgresql://h:5432/"])
def test_url_without_database(url: str) -> None:
    with pytest.raises(PluginError, match="names no database"):
        SqlTaskStore(url)


@pytest.mark.parametrize(
    ("url", "modules", "extra"),
    [
        ("postgresql://u@127.0.0.1/db", ("psycopg2", "psycopg"), "postgres"),
        ("postgres://u@127.0.0.1/db", ("psycopg2", "psycopg"), "postgres"),
        ("mysql://u@127.0.0.1/db", ("pymysql",), "mysql"),
    ],
)
def test_missing_driver_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, url: str, modules: tuple[str, ...], extra: str
) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # makes "import module" fail
    store = SqlTaskStore(url)
    with pytest.raises(PluginError) as err:
        store.open()
    assert f"pip install 'wpk-upgrade[{extra}]'" in str(err.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://wpk:S3cr3t-pw@127.0.0.1:1/tasks",
        "mysql://wpk:S3cr3t-pw@127.0.0.1:1/tasks",
    ],
)
def test_connection_failure_is_one_line_without_password(url: str) -> None:
    store = SqlTaskStore(url, {"connect_timeout": 2})
    assert "S3cr3t" not in repr(store)
    with pytest.raises(PluginError) as err:
        store.open()
    message = str(err.value)
    assert "S3cr3t" not in message and "\n" not in message
    assert "cannot open task store" in message and "***@127.0.0.1:1" in message


def test_password_with_special_characters_is_unquoted() -> None:
    store = SqlTaskStore("mysql://wpk:p%40ss%3Aword@db.example:3306/tasks")
    assert store.target.params["password"] == "p@ss:word"
    assert store.target.params["user"] == "wpk"
    assert "p%40ss" not in store.target.display


# ---------------------------------------------------------------------- scale smoke test


def test_latest_tasks_over_200k_tasks(tmp_path: Path) -> None:
    store = SqlTaskStore(sqlite_url(tmp_path / "big.db"))
    store.open()
    try:
        agents, per_agent = 1000, 200

        def rows() -> Iterator[Task]:
            for k in range(per_agent):
                for agent in range(1, agents + 1):
                    # Agents 1..100 end with two tasks created in the same second.
                    when = 1_600_000_000 + min(k, per_agent - 2 if agent <= 100 else k)
                    yield Task(
                        0,
                        agent,
                        "node01",
                        "upgrade_module",
                        "upgrade",
                        TaskStatus.DONE,
                        when,
                        when + 1,
                    )

        started = time.monotonic()
        assert store.bulk_load(rows(), batch=2000) == agents * per_agent
        loaded = time.monotonic() - started
        started = time.monotonic()
        latest = store.latest_tasks(list(range(1, agents + 1)))
        elapsed = time.monotonic() - started
        assert len(latest) == agents
        last_id = agents * per_agent
        for agent, task in latest.items():
            # Rows were inserted round by round: the last round has ids last_id-999..last_id.
            assert task.task_id == last_id - agents + agent
            assert task.agent_id == agent
        assert elapsed < 5, f"latest_tasks took {elapsed:.2f}s (load {loaded:.1f}s)"
        (new,) = create(store, [500], now=1_700_000_000)
        assert store.latest_tasks([500])[500] == new
    finally:
        store.close()


def test_options_reach_the_pool(tmp_path: Path) -> None:
    store = SqlTaskStore(sqlite_url(tmp_path / "t.db"), SqlStoreOptions(max_connections=2))
    store.open()
    try:
        assert store._db._max_connections == 2  # type: ignore[union-attr]
    finally:
        store.close()
    assert os.path.exists(tmp_path / "t.db")
