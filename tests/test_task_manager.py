"""The task manager over a real store: one transition table, timeouts, cleanup, retention.

* every status change of the store goes through ``models.check_transition`` (one table,
  enforced in one place): replacing it with a refusal stops every move, whatever the caller;
* the table is the reference's (§8.3) plus D7 and our two extensions, nothing else;
* the timeout counts from Updating (D7), queued tasks expire after ``pending_timeout``,
  final tasks are deleted after ``cleanup_time`` while their history stays for
  ``history_retention`` (``cleanup_once``, run by the daily sweep);
* ``[task_manager]`` configuration keys and their checks.

Driven with explicit clocks on a SQLite store; the sweep is also run by a real manager.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import wpk_store_sql.queries
from wpk_store_sql import SqlTaskStore

from wpk_upgrade.config import ManagerConfigSchema, TaskManagerSection, load_data
from wpk_upgrade.errors import ConfigError
from wpk_upgrade.interfaces import TaskFilter
from wpk_upgrade.models import (
    TRANSITIONS,
    NodeRule,
    TaskParams,
    TaskStatus,
    format_time,
    now,
)
from wpk_upgrade.plugin_manager import make_plugin_manager
from wpk_upgrade.taskmanager import TaskManager, reply_time
from wpk_upgrade.testing.harness import ManagerHarness

NODE = "node01"
T0 = 1_700_000_000
P = TaskStatus.PENDING
IP = TaskStatus.IN_PROGRESS


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlTaskStore]:
    s = SqlTaskStore(f"sqlite:///{tmp_path / 'tasks.db'}")
    s.open()
    yield s
    s.close()


def manager(store: SqlTaskStore, **settings: Any) -> TaskManager:
    return TaskManager(store, make_plugin_manager(), TaskManagerSection(**settings), NODE)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def create(store: SqlTaskStore, agents: list[int], when: int = T0) -> list[Any]:
    return store.create_tasks(
        agents, NODE, "upgrade_module", "upgrade", TaskParams("upgrade"), when
    )


# --------------------------------------------------------------------------- one table


def test_transition_table_is_the_reference_plus_d7_and_extensions() -> None:
    reference = {
        (P, IP): NodeRule.SAME_NODE,  # the node's worker starts it
        (IP, TaskStatus.DONE): NodeRule.ANY_NODE,  # the agent reports to any node
        (IP, TaskStatus.FAILED): NodeRule.ANY_NODE,
        (IP, TaskStatus.LEGACY): NodeRule.SAME_NODE,
        (P, TaskStatus.CANCELLED): NodeRule.ANY_NODE,  # cancel at start-up (node-wide)
        (IP, TaskStatus.TIMEOUT): NodeRule.ANY_NODE,  # the sweep
    }
    d7 = {
        (TaskStatus.TIMEOUT, TaskStatus.DONE): NodeRule.ANY_NODE,
        (TaskStatus.TIMEOUT, TaskStatus.FAILED): NodeRule.ANY_NODE,
    }
    extensions = {
        (IP, TaskStatus.CANCELLED): NodeRule.ANY_NODE,  # upgrade_cancel before the installer
        (P, TaskStatus.TIMEOUT): NodeRule.ANY_NODE,  # pending_timeout
    }
    assert TRANSITIONS == {**reference, **d7, **extensions}


def test_every_store_move_goes_through_check_transition(
    store: SqlTaskStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refuse every transition in the one place the store asks: nothing moves any more,
    whichever path (by agent, by id, claim, cancel, timeout sweep, task manager)."""
    done = create(store, [1, 2, 3, 4, 5])
    running = store.claim_pending(NODE, 2, now=T0 + 1)
    asked: list[tuple[TaskStatus, TaskStatus]] = []

    def refuse(current: TaskStatus, new: TaskStatus, task_node: str, node: str | None) -> bool:
        asked.append((current, new))
        return False

    monkeypatch.setattr(wpk_store_sql.queries, "check_transition", refuse)
    before = store.list_tasks(TaskFilter())
    tm = manager(store, task_timeout=10, pending_timeout=10)
    assert store.update_status(1, NODE, TaskStatus.DONE) == "not_found"
    assert not store.set_task_status(running[1].task_id, NODE, TaskStatus.FAILED)
    assert store.claim_pending(NODE, 10) == []
    assert store.cancel_pending(NODE) == 0
    assert store.expire(T0 + 10_000, 10)[0] == 0
    run(tm.sweep_once(T0 + 10_000))
    assert run(tm.cancel_agents([3]))[0]["error"] == 3
    assert store.list_tasks(TaskFilter()) == before
    assert {pair for pair in asked} >= {
        (IP, TaskStatus.DONE),
        (IP, TaskStatus.FAILED),
        (P, IP),
        (P, TaskStatus.CANCELLED),
        (IP, TaskStatus.TIMEOUT),
        (P, TaskStatus.TIMEOUT),
    }
    assert len(done) == 5


# --------------------------------------------------------------------------- timeouts


def test_timeout_counts_from_updating(store: SqlTaskStore) -> None:
    """D7: a task queued for longer than task_timeout does not time out; once Updating it
    times out task_timeout later (from the claim, not from creation)."""
    (task,) = create(store, [1], when=T0)
    tm = manager(store, task_timeout=900)
    assert run(tm.sweep_once(T0 + 5000)) == T0 + 5000 + 900
    assert store.get_task(task.task_id).status is P  # type: ignore[union-attr]
    (claimed,) = store.claim_pending(NODE, 1, now=T0 + 5000)
    assert run(tm.sweep_once(T0 + 5899)) == T0 + 5900  # the next deadline is its own
    assert store.get_task(task.task_id).status is IP  # type: ignore[union-attr]
    run(tm.sweep_once(T0 + 5900))
    got = store.get_task(task.task_id)
    assert got is not None and got.status is TaskStatus.TIMEOUT and got.update_time == T0 + 5900
    assert [c.to_status for c in store.history(task.task_id)] == [P, IP, TaskStatus.TIMEOUT]
    assert claimed.update_time == T0 + 5000


def test_pending_timeout(store: SqlTaskStore) -> None:
    """Queued tasks expire ``pending_timeout`` after their creation (the reference never
    times them out); without the key they wait for ever."""
    old, young = create(store, [1], when=T0)[0], create(store, [2], when=T0 + 100)[0]
    run(manager(store).sweep_once(T0 + 10**6))
    assert store.get_task(old.task_id).status is P  # type: ignore[union-attr]
    tm = manager(store, pending_timeout=300)
    run(tm.sweep_once(T0 + 299))
    assert store.get_task(old.task_id).status is P  # type: ignore[union-attr]
    run(tm.sweep_once(T0 + 300))
    got = store.get_task(old.task_id)
    assert got is not None and got.status is TaskStatus.TIMEOUT
    assert store.history(old.task_id)[-1].reason == "pending_timeout reached"
    assert store.get_task(young.task_id).status is P  # type: ignore[union-attr]
    (item,) = run(tm.results([1]))
    assert item["status"] == "Timeout" and item["error_msg"].startswith("Timeout reached")


def test_pending_timeout_through_a_running_manager(
    make_harness: Callable[..., ManagerHarness],
) -> None:
    """A real manager's sweep: a queued task of an agent that never connects here expires."""
    h = make_harness(task_manager={"pending_timeout": 1, "sweep_interval": 1})
    h.store.create_tasks([7], "node09", "upgrade_module", "upgrade", TaskParams("upgrade"))
    (item,) = h.wait_final([7], timeout=10)
    assert item["status"] == "Timeout"


def test_late_report_after_timeout_is_recorded(store: SqlTaskStore) -> None:
    (task,) = create(store, [1])
    store.claim_pending(NODE, 1, now=T0)
    tm = manager(store, task_timeout=60)
    run(tm.sweep_once(T0 + 60))
    assert run(tm.update_latest(1, "node02", TaskStatus.DONE, None, "agent report"))
    assert [c.to_status for c in store.history(task.task_id)] == [
        P,
        IP,
        TaskStatus.TIMEOUT,
        TaskStatus.DONE,
    ]


# --------------------------------------------------------------------------- cleanup


def test_cleanup_deletes_old_tasks_and_keeps_history_for_its_retention(
    store: SqlTaskStore,
) -> None:
    day = 86400
    tm = manager(store, cleanup_time=7 * day, history_retention=30 * day)
    old = create(store, [1, 2], when=T0)
    store.claim_pending(NODE, 2, now=T0 + 10)
    store.update_status(1, NODE, TaskStatus.DONE, now=T0 + 20)
    (recent,) = create(store, [3], when=T0 + 6 * day)
    # day 7: the finished task is deleted; the running one (agent 2) stays; history kept
    assert run(tm.cleanup_once(T0 + 7 * day)) == (1, 0)
    assert store.get_task(old[0].task_id) is None
    assert store.get_task(old[1].task_id) is not None
    assert store.get_task(recent.task_id) is not None
    assert len(store.history(old[0].task_id)) == 3
    # 30 days after its last change, the history of the deleted task goes (row by row, by
    # when each was recorded); the history of live tasks stays
    assert run(tm.cleanup_once(T0 + 30 * day + 10)) == (0, 2)
    assert [c.to_status for c in store.history(old[0].task_id)] == [TaskStatus.DONE]
    assert run(tm.cleanup_once(T0 + 30 * day + 20)) == (0, 1)
    assert store.history(old[0].task_id) == []
    assert len(store.history(old[1].task_id)) == 2
    assert len(store.history(recent.task_id)) == 1


def test_running_manager_cleans_up_at_start(
    tmp_path: Path, make_harness: Callable[..., ManagerHarness]
) -> None:
    """The sweep's daily cleanup runs once at start: tasks older than cleanup_time and
    history older than history_retention go."""
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    db = SqlTaskStore(url)
    db.open()
    t = now()
    (ancient,) = db.create_tasks([1], NODE, "m", "upgrade", None, now=t - 200 * 86400)
    db.set_task_status(ancient.task_id, None, TaskStatus.CANCELLED, now=t - 200 * 86400)
    (old,) = db.create_tasks([2], NODE, "m", "upgrade", None, now=t - 10 * 86400)
    db.set_task_status(old.task_id, None, TaskStatus.CANCELLED, now=t - 10 * 86400)
    (fresh,) = db.create_tasks([3], NODE, "m", "upgrade", None, now=t)
    db.close()
    h = make_harness(store={"url": url}, task_manager={"cleanup_time": "7d"})
    h.wait_for(lambda: h.store.get_task(old.task_id) is None, 10)
    h.wait_for(lambda: h.store.history(ancient.task_id) == [], 10)
    assert h.store.get_task(ancient.task_id) is None
    assert len(h.store.history(old.task_id)) == 2  # within the 90 days of retention
    assert h.store.get_task(fresh.task_id) is not None


def test_reply_time_is_format_time() -> None:
    """The cached formatter of ``upgrade_result`` items says what ``models.format_time``
    says (D2), for every kind of date."""
    rng = random.Random(7)
    samples = [0, None, 1, 59, 86399, 951782400, 4102444799, T0]
    samples += [rng.randrange(1, 4_102_444_800) for _ in range(2000)]
    for epoch in samples:
        assert reply_time(epoch) == format_time(epoch), epoch


# --------------------------------------------------------------------------- configuration


def _section(**keys: Any) -> TaskManagerSection:
    cfg = load_data({"home": "/tmp/x", "task_manager": keys}, ManagerConfigSchema())
    section: TaskManagerSection = cfg.task_manager
    return section


def test_task_manager_keys() -> None:
    default = _section()
    assert (default.task_timeout, default.cleanup_time) == (900, 604800)
    assert default.history_retention == 90 * 86400
    assert default.on_restart == "resume" and default.pending_timeout is None
    assert default.poll_interval == 2.0
    custom = _section(
        history_retention="400d", cleanup_time="200d", poll_interval=0.25, on_restart="cancel"
    )
    assert custom.history_retention == 400 * 86400 and custom.poll_interval == 0.25
    # without history_retention, the history lasts at least as long as the tasks
    assert _section(cleanup_time="120d").history_retention == 120 * 86400
    assert dataclasses.replace(default, pending_timeout=5).pending_timeout == 5


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"cleanup_time": "7d", "history_retention": "6d"}, "history_retention"),
        ({"task_timeout": "2h", "cleanup_time": "1h"}, "Too short cleanup_time"),
        ({"poll_interval": 0}, "poll_interval"),
        ({"history_retention": 0}, "history_retention"),
        ({"on_restart": "forget"}, "on_restart"),
    ],
)
def test_task_manager_key_errors(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _section(**keys)
