"""SQL task store on PostgreSQL and MariaDB/MySQL: the store contract and process races.

The servers are found (or started) by ``wpk_upgrade.testing.databases``; each test class gets
its own throw-away database, emptied before every test. A class is skipped only when no such
server is installed here at all (set ``WPK_TEST_POSTGRES_URL`` / ``WPK_TEST_MYSQL_URL`` to use
a remote one).
"""

from __future__ import annotations

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
