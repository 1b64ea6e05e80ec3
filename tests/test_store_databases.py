"""SQL task store on PostgreSQL and MariaDB/MySQL: the store contract and process races.

The servers are found (or started) by ``wpk_upgrade.testing.databases``; each test class gets
its own throw-away database, emptied before every test. A class is skipped only when no such
server is installed here at all (set ``WPK_TEST_POSTGRES_URL`` / ``WPK_TEST_MYSQL_URL`` to use
a remote one).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from wpk_store_sql import SqlTaskStore

from wpk_upgrade.interfaces import TaskStore
from wpk_upgrade.testing import databases
from wpk_upgrade.testing.store_contract import (
    CrossProcessContract,
    StoreSpec,
    TaskStoreContract,
    create,
)

FACTORY = "wpk_store_sql:SqlTaskStore"


@pytest.fixture(scope="class")
def postgres_url() -> Iterator[str]:
    server = databases.server_or_skip(databases.POSTGRESQL)
    with databases.temporary_database(server, prefix="wpk_store_test") as url:
        yield url


@pytest.fixture(scope="class")
def mysql_url() -> Iterator[str]:
    server = databases.server_or_skip(databases.MYSQL)
    with databases.temporary_database(server, prefix="wpk_store_test") as url:
        yield url


def _fresh_store(url: str) -> Iterator[TaskStore]:
    databases.truncate_tables(url)  # empty, ids from 1; the schema stays
    store = SqlTaskStore(url)
    store.open()
    yield store
    store.close()


class TestPostgresqlStore(TaskStoreContract, CrossProcessContract):
    @pytest.fixture
    def store(self, postgres_url: str) -> Iterator[TaskStore]:
        yield from _fresh_store(postgres_url)

    @pytest.fixture
    def store_spec(self, postgres_url: str) -> StoreSpec:
        return StoreSpec(FACTORY, postgres_url)

    def test_schema_and_indexes(self, store: TaskStore, postgres_url: str) -> None:
        conn = databases.connect(postgres_url)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'tasks'")
                indexes = {r[0] for r in cur.fetchall()}
                cur.execute("SELECT value FROM metadata WHERE name = 'schema_version'")
                assert cur.fetchone() == ("1",)
        finally:
            conn.close()
        assert {"tasks_agent_latest", "tasks_status_update", "tasks_node_status"} <= indexes

    def test_two_stores_on_one_database(self, store: TaskStore, postgres_url: str) -> None:
        other = SqlTaskStore(postgres_url)
        other.open()
        try:
            (task,) = create(store, [1])
            assert other.get_task(task.task_id) == task
            assert [t.task_id for t in other.claim_pending("node01", 5)] == [task.task_id]
            assert store.claim_pending("node01", 5) == []
        finally:
            other.close()


class TestMariadbStore(TaskStoreContract, CrossProcessContract):
    @pytest.fixture
    def store(self, mysql_url: str) -> Iterator[TaskStore]:
        yield from _fresh_store(mysql_url)

    @pytest.fixture
    def store_spec(self, mysql_url: str) -> StoreSpec:
        return StoreSpec(FACTORY, mysql_url)

    def test_schema_and_isolation(self, store: TaskStore, mysql_url: str) -> None:
        conn = databases.connect(mysql_url)
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW INDEX FROM tasks")
                indexes = {r[2] for r in cur.fetchall()}
                cur.execute("SELECT value FROM metadata WHERE name = 'schema_version'")
                assert cur.fetchone() == ("1",)
        finally:
            conn.close()
        assert {"tasks_agent_latest", "tasks_status_update", "tasks_node_status"} <= indexes
        db = store._db  # type: ignore[attr-defined]
        with db.connection_context():
            try:  # MySQL 8 and MariaDB 11.1+
                level = db.execute_sql("SELECT @@SESSION.transaction_isolation").fetchone()[0]
            except Exception:  # noqa: BLE001 - MariaDB before 11.1
                level = db.execute_sql("SELECT @@SESSION.tx_isolation").fetchone()[0]
        assert level == "READ-COMMITTED"


@pytest.mark.parametrize("kind", [databases.POSTGRESQL, databases.MYSQL])
def test_store_survives_killed_connections(kind: str) -> None:
    server = databases.server_or_skip(kind)
    with databases.temporary_database(server, prefix="wpk_store_test") as url:
        store = SqlTaskStore(url)
        store.open()
        try:
            create(store, [1])
            assert databases.terminate_connections(server, url) >= 1
            assert [t.task_id for t in create(store, [2])] == [2]
            assert sorted(store.latest_tasks([1, 2])) == [1, 2]
        finally:
            store.close()


def test_databases_helpers_round_trip() -> None:
    server = databases.server_or_skip(databases.POSTGRESQL)
    url = databases.create_database(server, prefix="wpk_helper_test")
    try:
        assert databases.reachable(url)
        store = SqlTaskStore(url)
        store.open()
        create(store, [1, 2])
        # An open pooled connection must not stop the drop.
    finally:
        databases.drop_database(server, url)
    assert not databases.reachable(url)
    store.close()


# ---------------------------------------------------------------------- finding servers


def test_find_server_starts_an_installed_server(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter([False, False, True])
    started: list[list[str]] = []
    monkeypatch.delenv(databases.POSTGRES_URL_ENV, raising=False)
    monkeypatch.setattr(databases, "reachable", lambda url, timeout=2.0: next(answers))
    monkeypatch.setattr(databases, "_postgres_start_commands", lambda: [["pg_ctlcluster", "x"]])
    monkeypatch.setattr(databases, "_start", lambda kind, cmds: started.extend(cmds))
    monkeypatch.setattr(databases.time, "sleep", lambda s: None)
    server = databases.find_server(databases.POSTGRESQL)
    assert server.admin_url == databases.DEFAULT_POSTGRES_URL
    assert started == [["pg_ctlcluster", "x"]]


def test_find_server_not_installed_or_not_starting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(databases.MYSQL_URL_ENV, raising=False)
    monkeypatch.setattr(databases, "reachable", lambda url, timeout=2.0: False)
    monkeypatch.setattr(databases, "_mysql_start_commands", lambda: [])
    with pytest.raises(databases.ServerNotInstalled, match="WPK_TEST_MYSQL_URL"):
        databases.find_server(databases.MYSQL)
    monkeypatch.setenv(databases.MYSQL_URL_ENV, "mysql://root@127.0.0.1:1/mysql")
    with pytest.raises(databases.ServerUnavailable):
        databases.find_server(databases.MYSQL)
    monkeypatch.setattr(databases, "_mysql_start_commands", lambda: [["mariadbd"]])
    monkeypatch.setattr(databases, "_start", lambda kind, cmds: None)
    with pytest.raises(databases.ServerUnavailable, match="did not accept connections"):
        databases.find_server(databases.MYSQL, timeout=0.2)


def test_server_url_for_and_unique_names() -> None:
    server = databases.Server(databases.MYSQL, "mysql://root:pw@db:3306/mysql?charset=utf8mb4")
    assert server.url_for("x_1") == "mysql://root:pw@db:3306/x_1?charset=utf8mb4"
    names = {databases.unique_name("wpk_t") for _ in range(50)}
    assert len(names) == 50 and all(n.startswith(f"wpk_t_{os.getpid()}_") for n in names)
    with pytest.raises(ValueError):
        databases.unique_name("bad-prefix")
