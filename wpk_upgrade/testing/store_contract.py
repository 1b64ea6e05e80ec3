"""Contract suite every ``TaskStore`` passes (built-in or third-party).

Use it by subclassing ``TaskStoreContract`` in a pytest module (the subclass name starts with
``Test``) and providing a fixture ``store``: an opened, empty store, closed at teardown.
Override ``reopen`` if your store cannot be closed and opened again in place.

For stores reachable from several processes (a database file or server), also subclass
``CrossProcessContract`` and provide ``store_spec``: a ``StoreSpec`` naming the store class
("module:attr"), URL and options, so worker processes can build their own instance of the
same (already opened once, so migrated) store.

What it pins down (reference §2.3, §2.4, §8; cases C076-C092 of categories F and G):

* creation: one Pending row per agent, ids in request order (1, 2 in an empty store, C076),
  all or nothing, parameters stored, a None -> Pending history row;
* the latest task of an agent: highest create_time, ties broken by highest task id;
* every pair of statuses x {same node, other node, internal actor} through ``update_status``
  and ``set_task_status`` against ``models.check_transition`` (C078, C090), with
  update_time, error_msg (NULL unless given) and a history row on each change;
* ``get_status``'s deletion of another node's Pending task (C091), the row shape (C081,
  C082, C092), cancel of a node's Pending tasks only (C084), timeout and cleanup (C085);
* ``claim_pending`` (oldest first, only tasks stored with parameters, ``skip_agents``) and
  ``create_tasks_if_idle``, progress, listing filters, the agent registry (``get_agents``),
  persistence across close/open, and races between threads (and processes, and nodes);
* phases for restart recovery: ``record_phase`` only while In progress, ``task_phase``,
  ``interrupted_transfers``; phase rows never show in ``history`` (not transitions); no
  In progress -> Cancelled once ``PHASE_INSTALLING`` is recorded, atomically with it.
"""

from __future__ import annotations

import importlib
import itertools
import multiprocessing
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from ..errors import TaskCode, TaskError
from ..interfaces import (
    PHASE_INSTALLING,
    PHASE_QUEUED,
    PHASE_TRANSFERRING,
    UPDATE_NOT_FOUND,
    UPDATE_OK,
    TaskFilter,
    TaskStore,
)
from ..models import (
    REQUESTABLE_STATUSES,
    TRANSITIONS,
    AgentInfo,
    NodeRule,
    StatusChange,
    Task,
    TaskParams,
    TaskStatus,
    check_transition,
)

NODE = "node01"
OTHER = "node02"
MODULE = "upgrade_module"
CMD = "upgrade"
T0 = 1_600_000_000
ALL_STATUSES = tuple(TaskStatus)
ACTORS = (NODE, OTHER, None)


def create(store: TaskStore, agents: list[int], node: str = NODE, now: int = T0) -> list[Task]:
    """Create upgrade tasks with the suite's defaults."""
    return store.create_tasks(agents, node, MODULE, CMD, TaskParams(command=CMD), now=now)


def task_in(
    store: TaskStore, agent: int, status: TaskStatus, node: str = NODE, now: int = T0
) -> Task:
    """A new task of ``agent`` brought to ``status`` through allowed transitions."""
    (task,) = create(store, [agent], node, now)
    path: list[tuple[TaskStatus, str | None]] = {
        TaskStatus.PENDING: [],
        TaskStatus.IN_PROGRESS: [(TaskStatus.IN_PROGRESS, node)],
        TaskStatus.DONE: [(TaskStatus.IN_PROGRESS, node), (TaskStatus.DONE, node)],
        TaskStatus.FAILED: [(TaskStatus.IN_PROGRESS, node), (TaskStatus.FAILED, node)],
        TaskStatus.LEGACY: [(TaskStatus.IN_PROGRESS, node), (TaskStatus.LEGACY, node)],
        TaskStatus.CANCELLED: [(TaskStatus.CANCELLED, None)],
        TaskStatus.TIMEOUT: [(TaskStatus.IN_PROGRESS, node), (TaskStatus.TIMEOUT, None)],
    }[status]
    for step, (target, actor) in enumerate(path, start=1):
        assert store.set_task_status(task.task_id, actor, target, now=now + step)
    fresh = store.get_task(task.task_id)
    assert fresh is not None and fresh.status is status
    return fresh


def _check_moved(
    after: Task | None,
    history: list[StatusChange],
    task: Task,
    current: TaskStatus,
    new: TaskStatus,
    actor: str | None,
    when: int,
) -> None:
    """``task`` (in ``current``) was moved to ``new`` by ``actor`` at ``when`` with error
    message "msg" and reason "why": its row, and the last history entry."""
    assert after == Task(
        task.task_id, task.agent_id, NODE, MODULE, CMD, new, task.create_time, when, "msg"
    )
    last = history[-1]
    assert (last.from_status, last.to_status, last.time, last.reason) == (
        current,
        new,
        when,
        "why",
    )
    if actor is not None:
        assert last.node == actor


class TaskStoreContract:
    """Subclass in a ``Test...`` class and provide the ``store`` fixture."""

    # ------------------------------------------------------------------ hooks for subclasses

    def reopen(self, store: TaskStore) -> TaskStore:
        """Close and open the store again (same data)."""
        store.close()
        store.open()
        return store

    # ------------------------------------------------------------------ creation (C076, C087)

    def test_create_ids_in_request_order_from_one(self, store: TaskStore) -> None:
        tasks = store.create_tasks([1, 2], "node05", MODULE, "upgrade", now=T0)
        assert [(t.agent_id, t.task_id) for t in tasks] == [(1, 1), (2, 2)]
        for task in tasks:
            assert task.status is TaskStatus.PENDING
            assert (task.node, task.module, task.command) == ("node05", MODULE, "upgrade")
            assert task.create_time == T0
            assert task.update_time is None and task.error_msg is None
            assert store.get_task(task.task_id) == task

    def test_create_keeps_request_order_and_repeats(self, store: TaskStore) -> None:
        tasks = create(store, [9, 3, 7, 3])
        assert [t.agent_id for t in tasks] == [9, 3, 7, 3]
        ids = [t.task_id for t in tasks]
        assert ids == sorted(ids) and len(set(ids)) == 4

    def test_create_nothing(self, store: TaskStore) -> None:
        assert store.create_tasks([], NODE, MODULE, CMD) == []
        assert store.list_tasks(TaskFilter()) == []

    def test_create_is_all_or_nothing(self, store: TaskStore) -> None:
        with pytest.raises(TaskError) as err:
            store.create_tasks([1, None], NODE, MODULE, CMD, now=T0)  # type: ignore[list-item]
        assert err.value.code == TaskCode.DATABASE_ERROR
        assert store.latest_tasks([1]) == {}
        assert store.list_tasks(TaskFilter()) == []

    def test_create_custom_command(self, store: TaskStore) -> None:
        (task,) = store.create_tasks([15], "master", "api", "upgrade_custom", now=T0)
        assert task.command == "upgrade_custom" and task.module == "api"
        assert store.get_status(15, "master") is TaskStatus.PENDING

    def test_create_uses_current_time_by_default(self, store: TaskStore) -> None:
        import time

        before = int(time.time())
        (task,) = store.create_tasks([1], NODE, MODULE, CMD)
        assert before <= task.create_time <= int(time.time()) + 1

    def test_params_round_trip(self, store: TaskStore) -> None:
        params = TaskParams(
            command="upgrade_custom",
            file_path="/tmp/x.wpk",
            installer="upgrade.sh",
            force_upgrade=True,
            use_http=True,
        )
        (task,) = store.create_tasks([4], NODE, MODULE, "upgrade_custom", params, now=T0)
        assert store.task_params(task.task_id) == params
        (bare,) = store.create_tasks([5], NODE, MODULE, CMD, None, now=T0)
        assert store.task_params(bare.task_id) is None
        assert store.task_params(999_999) is None

    def test_create_writes_history(self, store: TaskStore) -> None:
        (task,) = create(store, [1])
        (change,) = store.history(task.task_id)
        assert change.task_id == task.task_id
        assert change.from_status is None and change.to_status is TaskStatus.PENDING
        assert change.time == T0 and change.node == NODE

    # ------------------------------------------------------------------ reading (C081, C082, C092)

    def test_get_task_unknown(self, store: TaskStore) -> None:
        assert store.get_task(12345) is None

    def test_row_shape(self, store: TaskStore) -> None:
        (task,) = store.create_tasks([15], "master", MODULE, "upgrade_custom", now=123456)
        assert store.set_task_status(
            task.task_id, "master", TaskStatus.IN_PROGRESS, "Error message", now=123465
        )
        got = store.get_task(task.task_id)
        assert got == Task(
            task.task_id,
            15,
            "master",
            MODULE,
            "upgrade_custom",
            TaskStatus.IN_PROGRESS,
            123456,
            123465,
            "Error message",
            0,
            0,
        )
        assert isinstance(got.status, TaskStatus)
        assert all(
            isinstance(v, int)
            for v in (
                got.task_id,
                got.agent_id,
                got.create_time,
                got.update_time,
                got.bytes_sent,
                got.bytes_total,
            )
        )

    def test_latest_task_shape(self, store: TaskStore) -> None:
        create(store, [35], "node01", now=789456000)
        (task,) = create(store, [35], "node01", now=789456123)
        assert store.set_task_status(
            task.task_id, "node01", TaskStatus.IN_PROGRESS, "Error string", now=987654321
        )
        latest = store.latest_tasks([35, 36])
        assert set(latest) == {35}
        assert latest[35] == Task(
            task.task_id,
            35,
            "node01",
            MODULE,
            CMD,
            TaskStatus.IN_PROGRESS,
            789456123,
            987654321,
            "Error string",
        )

    def test_no_task_for_agent(self, store: TaskStore) -> None:
        create(store, [1])
        assert store.latest_tasks([35]) == {}
        assert store.latest_tasks([]) == {}
        assert store.get_status(35, NODE) is None
        assert store.update_status(35, NODE, TaskStatus.IN_PROGRESS) == UPDATE_NOT_FOUND

    def test_latest_is_newest_create_time_then_highest_id(self, store: TaskStore) -> None:
        (newer,) = create(store, [1], now=T0 + 100)
        create(store, [1], now=T0 + 50)  # higher id, older creation
        assert store.latest_tasks([1])[1].task_id == newer.task_id
        (tie,) = create(store, [1], now=T0 + 100)  # same second: the higher id wins
        assert store.latest_tasks([1])[1].task_id == tie.task_id
        assert store.get_status(1, NODE) is TaskStatus.PENDING
        assert store.set_task_status(newer.task_id, NODE, TaskStatus.IN_PROGRESS)
        assert store.get_status(1, NODE) is TaskStatus.PENDING  # still the tie winner's

    def test_latest_tasks_many_agents(self, store: TaskStore) -> None:
        agents = list(range(1, 1201))
        create(store, agents, now=T0)
        second = create(store, agents[::2], now=T0 + 10)
        latest = store.latest_tasks([*agents, 5000])
        assert len(latest) == 1200
        expected = {t.agent_id: t.task_id for t in second}
        for agent, task in latest.items():
            assert task.agent_id == agent
            if agent in expected:
                assert task.task_id == expected[agent] and task.create_time == T0 + 10
            else:
                assert task.create_time == T0

    # ------------------------------------------------------------------ transitions (C078, C090)

    def test_update_status_in_progress_to_done_from_any_node(self, store: TaskStore) -> None:
        task = task_in(store, 35, TaskStatus.IN_PROGRESS, node="node01")
        assert store.update_status(35, "node02", TaskStatus.DONE, now=T0 + 50) == UPDATE_OK
        got = store.get_task(task.task_id)
        assert got is not None and got.status is TaskStatus.DONE
        assert got.update_time == T0 + 50 and got.error_msg is None

    def test_transition_matrix_update_status(self, store: TaskStore) -> None:
        self._check_matrix(store, by_id=False)

    def test_transition_matrix_set_task_status(self, store: TaskStore) -> None:
        self._check_matrix(store, by_id=True)

    def _check_matrix(self, store: TaskStore, by_id: bool) -> None:
        agents = itertools.count(1)
        failures = []
        for current, new, actor in itertools.product(ALL_STATUSES, ALL_STATUSES, ACTORS):
            agent = next(agents)
            task = task_in(store, agent, current, node=NODE)
            history_before = store.history(task.task_id)
            when = T0 + 1000
            if by_id:
                moved = store.set_task_status(task.task_id, actor, new, "msg", "why", now=when)
            else:
                outcome = store.update_status(agent, actor, new, "msg", "why", now=when)
                assert outcome in (UPDATE_OK, UPDATE_NOT_FOUND)
                moved = outcome == UPDATE_OK
            expected = check_transition(current, new, NODE, actor)
            after = store.get_task(task.task_id)
            history = store.history(task.task_id)
            if moved != expected:
                failures.append(f"{current.value} -> {new.value} by {actor}: moved={moved}")
                continue
            if expected:
                assert len(history) == len(history_before) + 1
                _check_moved(after, history, task, current, new, actor, when)
            else:
                assert after == task
                assert history == history_before
        assert not failures, failures

    def test_transition_matrix_update_status_many(self, store: TaskStore) -> None:
        """One ``update_status_many`` per (new status, actor) over agents whose latest tasks
        are in every status (plus one agent without a task): the same moves, rows and
        history as ``update_status`` one by one."""
        agents = itertools.count(1)
        when = T0 + 1000
        failures = []
        for new, actor in itertools.product(ALL_STATUSES, ACTORS):
            tasks = {next(agents): current for current in ALL_STATUSES}
            made = {a: task_in(store, a, current, node=NODE) for a, current in tasks.items()}
            nobody = next(agents)
            moved = store.update_status_many(
                [*tasks, nobody, *tasks], actor, new, "msg", "why", now=when
            )
            for agent, current in tasks.items():
                expected = check_transition(current, new, NODE, actor)
                if (agent in moved) != expected:
                    failures.append(f"{current.value} -> {new.value} by {actor}")
                    continue
                task = made[agent]
                after = store.get_task(task.task_id)
                history = store.history(task.task_id)
                if not expected:
                    assert after == task and history[-1].to_status is current
                    continue
                assert moved[agent] == task  # as it was before the move
                _check_moved(after, history, task, current, new, actor, when)
            assert nobody not in moved
        assert not failures, failures

    def test_update_status_many_refuses_cancel_once_installing(self, store: TaskStore) -> None:
        installing = task_in(store, 1, TaskStatus.IN_PROGRESS)
        task_in(store, 2, TaskStatus.IN_PROGRESS)
        assert store.record_phase(installing.task_id, PHASE_INSTALLING)
        moved = store.update_status_many([1, 2], NODE, TaskStatus.CANCELLED)
        assert set(moved) == {2}
        assert store.get_task(installing.task_id).status is TaskStatus.IN_PROGRESS  # type: ignore[union-attr]

    def test_every_table_entry_is_reachable(self, store: TaskStore) -> None:
        agents = itertools.count(1)
        for (current, new), rule in TRANSITIONS.items():
            agent = next(agents)
            task = task_in(store, agent, current)
            if rule is NodeRule.SAME_NODE:
                assert store.update_status(agent, OTHER, new) == UPDATE_NOT_FOUND
            assert store.update_status(agent, NODE, new) == UPDATE_OK, (current, new)
            assert store.get_task(task.task_id).status is new  # type: ignore[union-attr]

    def test_requestable_statuses_from_their_source_status(self, store: TaskStore) -> None:
        sources = {TaskStatus.IN_PROGRESS: TaskStatus.PENDING}
        for agent, status in enumerate(sorted(REQUESTABLE_STATUSES, key=str), start=1):
            task_in(store, agent, sources.get(status, TaskStatus.IN_PROGRESS))
            assert store.update_status(agent, NODE, status, now=T0 + 9) == UPDATE_OK
            assert store.get_status(agent, NODE) is status

    def test_final_statuses_refuse_repeats(self, store: TaskStore) -> None:
        task_in(store, 1, TaskStatus.DONE)
        assert store.update_status(1, NODE, TaskStatus.DONE) == UPDATE_NOT_FOUND
        assert store.update_status(1, NODE, TaskStatus.FAILED) == UPDATE_NOT_FOUND

    def test_update_status_moves_only_the_latest_task(self, store: TaskStore) -> None:
        old = task_in(store, 1, TaskStatus.IN_PROGRESS, now=T0)
        create(store, [1], now=T0 + 10)
        assert store.update_status(1, NODE, TaskStatus.DONE) == UPDATE_NOT_FOUND
        assert store.get_task(old.task_id).status is TaskStatus.IN_PROGRESS  # type: ignore[union-attr]
        assert store.set_task_status(old.task_id, NODE, TaskStatus.DONE)

    def test_error_msg_is_cleared_unless_given(self, store: TaskStore) -> None:
        task = task_in(store, 1, TaskStatus.IN_PROGRESS)
        assert store.set_task_status(task.task_id, None, TaskStatus.TIMEOUT, "late", now=T0 + 5)
        assert store.get_task(task.task_id).error_msg == "late"  # type: ignore[union-attr]
        # D7: a late success after Timeout is recorded; the history keeps the Timeout.
        assert store.update_status(1, OTHER, TaskStatus.DONE, now=T0 + 6) == UPDATE_OK
        got = store.get_task(task.task_id)
        assert got is not None and got.error_msg is None and got.update_time == T0 + 6
        statuses = [c.to_status for c in store.history(task.task_id)]
        assert statuses == [
            TaskStatus.PENDING,
            TaskStatus.IN_PROGRESS,
            TaskStatus.TIMEOUT,
            TaskStatus.DONE,
        ]

    def test_set_task_status_unknown_task(self, store: TaskStore) -> None:
        assert store.set_task_status(4242, NODE, TaskStatus.IN_PROGRESS) is False

    # ------------------------------------------------------------------ get_status (C091)

    def test_get_status_same_node_keeps_pending(self, store: TaskStore) -> None:
        (task,) = create(store, [7], node="old")
        assert store.get_status(7, "old") is TaskStatus.PENDING
        assert store.get_task(task.task_id) is not None

    def test_get_status_other_node_deletes_pending(self, store: TaskStore) -> None:
        earlier = task_in(store, 7, TaskStatus.DONE, node="old", now=T0)
        (task,) = create(store, [7], node="old", now=T0 + 10)
        assert store.get_status(7, "new") is None
        assert store.get_task(task.task_id) is None
        history = store.history(task.task_id)
        assert history[-1].from_status is TaskStatus.PENDING
        assert history[-1].node == "new"
        # The earlier task is the latest again.
        assert store.get_status(7, "new") is TaskStatus.DONE
        assert store.latest_tasks([7])[7].task_id == earlier.task_id

    def test_get_status_other_node_keeps_other_statuses(self, store: TaskStore) -> None:
        for agent, status in enumerate(ALL_STATUSES, start=1):
            if status is TaskStatus.PENDING:
                continue
            task = task_in(store, agent, status, node="old")
            assert store.get_status(agent, "new") is status
            assert store.get_task(task.task_id) == task

    def test_deleted_task_id_is_never_reused(self, store: TaskStore) -> None:
        create(store, [1, 2])
        assert store.get_status(2, OTHER) is None  # deletes task 2, the highest id
        (task,) = create(store, [3])
        assert task.task_id == 3

    # ------------------------------------------------------------------ cancel (C084)

    def test_cancel_pending_of_one_node(self, store: TaskStore) -> None:
        p1, p2 = create(store, [1, 2], node="node02")
        running = task_in(store, 3, TaskStatus.IN_PROGRESS, node="node02")
        (foreign,) = create(store, [4], node="node01")
        assert store.cancel_pending("node02", now=T0 + 30) == 2
        for task in (p1, p2):
            got = store.get_task(task.task_id)
            assert got is not None and got.status is TaskStatus.CANCELLED
            assert got.update_time == T0 + 30
            last = store.history(task.task_id)[-1]
            assert (last.from_status, last.to_status, last.time) == (
                TaskStatus.PENDING,
                TaskStatus.CANCELLED,
                T0 + 30,
            )
        assert store.get_task(running.task_id) == running
        assert store.get_task(foreign.task_id) == foreign
        assert store.cancel_pending("node02") == 0

    # ------------------------------------------------------------------ timeout, cleanup (C085)

    def test_expire_and_next_deadline(self, store: TaskStore) -> None:
        now, timeout = 123456789, 850
        expired = task_in(store, 1, TaskStatus.IN_PROGRESS, now=now - 851)  # updated now-850
        young = task_in(store, 2, TaskStatus.IN_PROGRESS, now=now - 850)  # updated now-849
        pending = create(store, [3], now=now - 5000)[0]
        assert store.expire(now, timeout) == (1, now - 849 + timeout)
        got = store.get_task(expired.task_id)
        assert got is not None and got.status is TaskStatus.TIMEOUT and got.update_time == now
        last = store.history(expired.task_id)[-1]
        assert (last.from_status, last.to_status, last.time) == (
            TaskStatus.IN_PROGRESS,
            TaskStatus.TIMEOUT,
            now,
        )
        assert store.get_task(young.task_id) == young
        assert store.get_task(pending.task_id) == pending  # Pending never times out
        assert store.expire(now, timeout) == (0, now - 849 + timeout)
        assert store.set_task_status(young.task_id, OTHER, TaskStatus.DONE)
        assert store.expire(now, timeout) == (0, now + timeout)

    def test_delete_old_keeps_active_and_recent(self, store: TaskStore) -> None:
        now, cleanup = 123456789, 1000
        old_done = task_in(store, 1, TaskStatus.DONE, now=now - 1000)
        old_failed = task_in(store, 2, TaskStatus.FAILED, now=now - 5000)
        old_pending = create(store, [3], now=now - 5000)[0]
        old_running = task_in(store, 4, TaskStatus.IN_PROGRESS, now=now - 5000)
        recent = task_in(store, 5, TaskStatus.DONE, now=now - 999)
        assert store.delete_old(now - cleanup) == 2
        assert store.get_task(old_done.task_id) is None
        assert store.get_task(old_failed.task_id) is None
        for task in (old_pending, old_running, recent):
            assert store.get_task(task.task_id) is not None
        assert store.history(old_done.task_id)  # history outlives the task
        assert store.latest_tasks([1, 2]) == {}

    def test_delete_history_before(self, store: TaskStore) -> None:
        delete_history = store.delete_history_before
        gone = task_in(store, 1, TaskStatus.DONE, now=T0)
        kept = task_in(store, 2, TaskStatus.DONE, now=T0)
        assert store.delete_old(T0) == 2
        (alive,) = create(store, [3], now=T0)
        rows = len(store.history(gone.task_id)) + len(store.history(kept.task_id))
        assert rows == 6
        assert delete_history(T0 + 10) == rows
        assert store.history(gone.task_id) == []
        assert len(store.history(alive.task_id)) == 1  # its task still exists

    # ------------------------------------------------------------------ claim and idle intake

    def test_claim_pending_oldest_first(self, store: TaskStore) -> None:
        newer = create(store, [1, 2], now=T0 + 10)
        older = create(store, [3], now=T0)
        create(store, [4], node=OTHER, now=T0)
        task_in(store, 5, TaskStatus.IN_PROGRESS)
        claimed = store.claim_pending(NODE, 2)
        assert [t.task_id for t in claimed] == [older[0].task_id, newer[0].task_id]
        for task in claimed:
            assert task.status is TaskStatus.IN_PROGRESS
            assert store.get_task(task.task_id) == task
            last = store.history(task.task_id)[-1]
            assert (last.from_status, last.to_status, last.node) == (
                TaskStatus.PENDING,
                TaskStatus.IN_PROGRESS,
                NODE,
            )
        assert [t.task_id for t in store.claim_pending(NODE, 10)] == [newer[1].task_id]
        assert store.claim_pending(NODE, 10) == []
        assert store.claim_pending(NODE, 0) == []
        assert [t.agent_id for t in store.pending_tasks(OTHER)] == [4]

    def test_claim_pending_records_time_and_skips(self, store: TaskStore) -> None:
        (a, b, c) = create(store, [1, 2, 3], now=T0)
        (bare,) = store.create_tasks([4], NODE, MODULE, CMD, None, now=T0 - 5)  # record only
        claimed = store.claim_pending(NODE, 10, now=T0 + 7, skip_agents=[2])
        assert [t.task_id for t in claimed] == [a.task_id, c.task_id]
        assert all(t.update_time == T0 + 7 for t in claimed)
        assert store.get_task(a.task_id).update_time == T0 + 7  # type: ignore[union-attr]
        assert store.history(a.task_id)[-1].time == T0 + 7
        assert [t.task_id for t in store.claim_pending(NODE, 10)] == [b.task_id]
        assert store.claim_pending(NODE, 10) == []
        assert store.get_task(bare.task_id).status is TaskStatus.PENDING  # type: ignore[union-attr]

    # ------------------------------------------------------------------ phases (recovery)

    def test_phases(self, store: TaskStore) -> None:
        (task,) = create(store, [1], now=T0)
        assert store.task_phase(task.task_id) == PHASE_QUEUED
        assert store.record_phase(task.task_id, PHASE_INSTALLING, now=T0 + 1) is False
        (claimed,) = store.claim_pending(NODE, 1, now=T0 + 2)
        assert store.task_phase(task.task_id) == PHASE_TRANSFERRING
        assert [t.task_id for t in store.interrupted_transfers(NODE)] == [task.task_id]
        assert store.interrupted_transfers(OTHER) == []
        assert store.record_phase(task.task_id, PHASE_INSTALLING, now=T0 + 3) is True
        assert store.task_phase(task.task_id) == PHASE_INSTALLING
        assert store.interrupted_transfers(NODE) == []
        # a phase is not a status change: the task and its transitions are unchanged
        assert store.get_task(task.task_id) == claimed
        assert [c.to_status for c in store.history(task.task_id)] == [
            TaskStatus.PENDING,
            TaskStatus.IN_PROGRESS,
        ]
        assert store.set_task_status(task.task_id, OTHER, TaskStatus.DONE, now=T0 + 4)
        assert store.task_phase(task.task_id) is None
        assert store.record_phase(task.task_id, PHASE_INSTALLING) is False
        assert store.task_phase(999_999) is None
        assert store.record_phase(999_999, PHASE_INSTALLING) is False

    def test_interrupted_transfers(self, store: TaskStore) -> None:
        cut = task_in(store, 1, TaskStatus.IN_PROGRESS)
        installing = task_in(store, 2, TaskStatus.IN_PROGRESS)
        assert store.record_phase(installing.task_id, PHASE_INSTALLING)
        (bare,) = store.create_tasks([3], NODE, MODULE, CMD, None, now=T0)  # record only
        assert store.set_task_status(bare.task_id, NODE, TaskStatus.IN_PROGRESS)
        task_in(store, 4, TaskStatus.IN_PROGRESS, node=OTHER)
        task_in(store, 5, TaskStatus.TIMEOUT)
        create(store, [6])
        later = task_in(store, 7, TaskStatus.IN_PROGRESS)
        got = store.interrupted_transfers(NODE)
        assert [t.task_id for t in got] == [cut.task_id, later.task_id]
        assert got[0] == cut

    def test_no_cancel_once_the_installer_phase_is_recorded(self, store: TaskStore) -> None:
        """In progress -> Cancelled is refused once ``PHASE_INSTALLING`` is recorded (the
        agent may be installing: ``upgrade_cancel`` must not hide its outcome), by id and by
        agent; the task still reaches its outcome. A task cancelled first gets no installer
        phase (the dispatcher then never sends ``upgrade``)."""
        installing = task_in(store, 1, TaskStatus.IN_PROGRESS)
        assert store.record_phase(installing.task_id, PHASE_INSTALLING, now=T0 + 5)
        history = store.history(installing.task_id)
        cancel = TaskStatus.CANCELLED
        assert not store.set_task_status(installing.task_id, None, cancel, "m", "r", now=T0 + 6)
        assert not store.set_task_status(installing.task_id, OTHER, cancel, now=T0 + 6)
        assert store.update_status(1, None, cancel, now=T0 + 6) == UPDATE_NOT_FOUND
        assert store.get_task(installing.task_id) == installing
        assert store.history(installing.task_id) == history
        assert store.task_phase(installing.task_id) == PHASE_INSTALLING
        assert store.update_status(1, OTHER, TaskStatus.DONE, now=T0 + 7) == UPDATE_OK
        timing_out = task_in(store, 2, TaskStatus.IN_PROGRESS)
        assert store.record_phase(timing_out.task_id, PHASE_INSTALLING)
        assert store.set_task_status(timing_out.task_id, None, TaskStatus.TIMEOUT)

        transferring = task_in(store, 3, TaskStatus.IN_PROGRESS)
        assert store.set_task_status(transferring.task_id, None, cancel, now=T0 + 6)
        assert store.record_phase(transferring.task_id, PHASE_INSTALLING) is False
        assert store.task_phase(transferring.task_id) is None
        create(store, [4])
        assert store.update_status(4, None, cancel) == UPDATE_OK

    # ------------------------------------------------------------------ idle intake

    def test_create_if_idle(self, store: TaskStore) -> None:
        task_in(store, 1, TaskStatus.DONE)
        task_in(store, 2, TaskStatus.IN_PROGRESS, node=OTHER)
        create(store, [3])  # Pending, same node
        (foreign,) = create(store, [4], node=OTHER)  # Pending, other node: deleted
        created, busy = store.create_tasks_if_idle(
            [1, 2, 3, 4, 5, 5], NODE, MODULE, CMD, TaskParams(command=CMD), now=T0 + 100
        )
        assert [t.agent_id for t in created] == [1, 4, 5]
        assert busy == [2, 3, 5]
        for task in created:
            assert task.status is TaskStatus.PENDING and task.node == NODE
            assert task.create_time == T0 + 100
            assert store.get_task(task.task_id) == task
            assert store.task_params(task.task_id) == TaskParams(command=CMD)
            assert [c.to_status for c in store.history(task.task_id)] == [TaskStatus.PENDING]
        assert store.get_task(foreign.task_id) is None
        ids = [t.task_id for t in created]
        assert ids == sorted(ids)
        assert store.create_tasks_if_idle([], NODE, MODULE, CMD) == ([], [])

    # ------------------------------------------------------------------ other queries

    def test_pending_tasks(self, store: TaskStore) -> None:
        later = create(store, [1], now=T0 + 5)
        first = create(store, [2, 3], now=T0)
        create(store, [4], node=OTHER)
        task_in(store, 5, TaskStatus.IN_PROGRESS)
        ids = [t.task_id for t in store.pending_tasks(NODE)]
        assert ids == [first[0].task_id, first[1].task_id, later[0].task_id]
        assert [t.task_id for t in store.pending_tasks(NODE, limit=1)] == [first[0].task_id]
        assert store.pending_tasks("nowhere") == []

    def test_tasks_in_status(self, store: TaskStore) -> None:
        a = task_in(store, 1, TaskStatus.IN_PROGRESS, node=NODE)
        b = task_in(store, 2, TaskStatus.IN_PROGRESS, node=OTHER)
        task_in(store, 3, TaskStatus.DONE, node=NODE)
        assert store.tasks_in_status(NODE, TaskStatus.IN_PROGRESS) == [a]
        assert sorted(
            t.task_id for t in store.tasks_in_status(None, TaskStatus.IN_PROGRESS)
        ) == sorted([a.task_id, b.task_id])
        assert store.tasks_in_status(None, TaskStatus.LEGACY) == []

    def test_progress(self, store: TaskStore) -> None:
        (task,) = create(store, [1])
        store.set_progress(task.task_id, 32768, 150000)
        got = store.get_task(task.task_id)
        assert got is not None and (got.bytes_sent, got.bytes_total) == (32768, 150000)
        assert got.update_time is None  # progress is not a status change
        store.set_progress(task.task_id, 150000, 150000)
        assert store.get_task(task.task_id).bytes_sent == 150000  # type: ignore[union-attr]
        store.set_progress(99999, 1, 1)  # unknown task: nothing happens
        assert store.history(task.task_id)[-1].to_status is TaskStatus.PENDING

    def test_history_unknown_task(self, store: TaskStore) -> None:
        assert store.history(777) == []

    def test_list_tasks_filters(self, store: TaskStore) -> None:
        t1 = task_in(store, 1, TaskStatus.DONE, node=NODE, now=T0)
        t2 = task_in(store, 2, TaskStatus.IN_PROGRESS, node=OTHER, now=T0 + 10)
        (t3,) = create(store, [3], node=NODE, now=T0 + 20)
        (t4,) = create(store, [1], node=NODE, now=T0 + 20)

        def ids(**kw: Any) -> list[int]:
            return [t.task_id for t in store.list_tasks(TaskFilter(**kw))]

        assert ids() == [t4.task_id, t3.task_id, t2.task_id, t1.task_id]
        assert ids(statuses=(TaskStatus.PENDING,)) == [t4.task_id, t3.task_id]
        assert ids(statuses=(TaskStatus.DONE, TaskStatus.IN_PROGRESS)) == [t2.task_id, t1.task_id]
        assert ids(agent_ids=(1,)) == [t4.task_id, t1.task_id]
        assert ids(agent_ids=()) == []
        assert ids(node=OTHER) == [t2.task_id]
        assert ids(since=T0 + 10) == [t4.task_id, t3.task_id, t2.task_id]
        assert ids(until=T0 + 10) == [t2.task_id, t1.task_id]
        assert ids(since=T0 + 5, until=T0 + 15) == [t2.task_id]
        assert ids(limit=2) == [t4.task_id, t3.task_id]
        assert ids(agent_ids=(1, 2), statuses=(TaskStatus.DONE,), node=NODE) == [t1.task_id]
        assert store.list_tasks(TaskFilter(agent_ids=(2,)))[0] == t2

    def test_list_tasks_many_agent_ids(self, store: TaskStore) -> None:
        create(store, list(range(1, 1101)), now=T0)
        found = store.list_tasks(TaskFilter(agent_ids=tuple(range(1, 2001)), limit=5000))
        assert len(found) == 1100
        assert len(store.list_tasks(TaskFilter(agent_ids=tuple(range(1, 2001)), limit=7))) == 7

    # ------------------------------------------------------------------ agents

    def test_agents_upsert_get_list(self, store: TaskStore) -> None:
        a5 = AgentInfo(5, "web-5", "v4.8.0", "ubuntu", "22", "04", "x86_64", "active", NODE, T0)
        a2 = AgentInfo(
            2, "db-2", "v4.0.0", "windows", "10", "0", "x86_64", "disconnected", OTHER, None
        )
        store.upsert_agent(a5)
        store.upsert_agent(a2)
        assert store.get_agent(5) == a5
        assert store.get_agent(99) is None
        assert store.list_agents() == [a2, a5]
        newer = AgentInfo(
            5, "web-5b", "v4.9.0", "ubuntu", "24", "04", "aarch64", "disconnected", OTHER, T0 + 9
        )
        store.upsert_agent(newer)
        assert store.get_agent(5) == newer
        assert len(store.list_agents()) == 2

    def test_get_agents(self, store: TaskStore) -> None:
        agents = [
            AgentInfo(i, f"a{i}", "v4.8.0", node=NODE if i % 2 else OTHER) for i in range(1, 1202)
        ]
        for agent in agents[:3]:
            store.upsert_agent(agent)
        for agent in agents[3:]:
            store.set_connection(agent.agent_id, "active", agent.node, T0)
        wanted = [2, 1, 5000, 2, *range(600, 1202)]
        got = store.get_agents(wanted)
        assert sorted(got) == [1, 2, *range(600, 1202)]
        assert got[1] == agents[0] and got[2] == agents[1]
        assert got[700] == store.get_agent(700)
        assert store.get_agents([]) == {}

    def test_set_connection(self, store: TaskStore) -> None:
        store.set_connection(7, "active", NODE, T0)
        got = store.get_agent(7)
        assert got is not None
        assert (got.agent_id, got.connection_status, got.node, got.last_seen) == (
            7,
            "active",
            NODE,
            T0,
        )
        full = AgentInfo(8, "mail", "v4.8.0", "centos", "8", "4", "x86_64", "active", NODE, T0)
        store.upsert_agent(full)
        store.set_connection(8, "disconnected", OTHER, T0 + 60)
        assert store.get_agent(8) == AgentInfo(
            8, "mail", "v4.8.0", "centos", "8", "4", "x86_64", "disconnected", OTHER, T0 + 60
        )

    def test_disconnect_node_agents(self, store: TaskStore) -> None:
        store.set_connection(1, "active", NODE, T0)
        store.set_connection(2, "active", NODE, T0)
        store.set_connection(3, "active", OTHER, T0)
        store.set_connection(4, "disconnected", NODE, T0)
        assert store.disconnect_node_agents(NODE) == 2
        assert [a.connection_status for a in store.list_agents()] == [
            "disconnected",
            "disconnected",
            "active",
            "disconnected",
        ]
        assert store.disconnect_node_agents(NODE) == 0

    # ------------------------------------------------------------------ persistence

    def test_persists_across_close_and_open(self, store: TaskStore) -> None:
        done = task_in(store, 1, TaskStatus.DONE)
        (pending,) = create(store, [2], node=OTHER, now=T0 + 1)
        store.set_progress(pending.task_id, 10, 20)
        agent = AgentInfo(1, "a", "v4.8.0", connection_status="active", node=NODE)
        store.upsert_agent(agent)
        history = store.history(done.task_id)
        store = self.reopen(store)
        assert store.get_task(done.task_id) == done
        assert store.get_task(pending.task_id).bytes_sent == 10  # type: ignore[union-attr]
        assert store.history(done.task_id) == history
        assert store.get_agent(1) == agent
        assert store.task_params(done.task_id) == TaskParams(command=CMD)
        (third,) = create(store, [3])
        assert third.task_id > pending.task_id

    def test_open_when_open_is_harmless(self, store: TaskStore) -> None:
        store.open()  # already open: no effect
        create(store, [1])
        store = self.reopen(store)
        assert len(store.list_tasks(TaskFilter())) == 1

    def test_close_while_busy(self, store: TaskStore) -> None:
        # Operations running when close() is called finish or raise TaskError; none crashes.
        stop = threading.Event()
        outcomes: list[str] = []

        def hammer(i: int) -> None:
            agent = 1000 + i
            while not stop.is_set():
                try:
                    (task,) = create(store, [agent])
                    store.set_task_status(task.task_id, NODE, TaskStatus.IN_PROGRESS)
                    store.latest_tasks([agent])
                    store.set_connection(agent, "active", NODE, T0)
                except TaskError:
                    outcomes.append("closed")
                    return
                except BaseException as exc:  # noqa: BLE001 - reported below
                    outcomes.append(repr(exc))
                    return
            outcomes.append("stopped")

        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        import time

        time.sleep(0.3)
        store.close()
        time.sleep(0.1)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        assert set(outcomes) <= {"closed", "stopped"}, outcomes
        store.open()
        assert store.list_tasks(TaskFilter(agent_ids=(1000,)))

    # ------------------------------------------------------------------ races between threads

    def test_race_create_if_idle_one_agent(self, store: TaskStore) -> None:
        results = _in_threads(
            8,
            lambda i: store.create_tasks_if_idle([42], NODE, MODULE, CMD, TaskParams(command=CMD)),
        )
        created = [t for made, _ in results for t in made]
        busy = [a for _, b in results for a in b]
        assert len(created) == 1 and busy == [42] * 7
        assert store.latest_tasks([42])[42] == created[0]
        assert len(store.list_tasks(TaskFilter(agent_ids=(42,)))) == 1

    def test_race_create_if_idle_two_nodes(self, store: TaskStore) -> None:
        # A node may take over another node's Pending task (it is deleted), so several
        # tasks may be created in turn, but only one is ever left active.
        results = _in_threads(
            8, lambda i: store.create_tasks_if_idle([42], NODE if i % 2 else OTHER, MODULE, CMD)
        )
        created = [t for made, _ in results for t in made]
        assert created
        remaining = store.list_tasks(TaskFilter(agent_ids=(42,)))
        assert len(remaining) == 1 and remaining[0].status is TaskStatus.PENDING
        assert remaining[0].task_id == max(t.task_id for t in created)

    def test_race_create_if_idle_overlapping_sets(self, store: TaskStore) -> None:
        agents = list(range(1, 41))
        results = _in_threads(
            6,
            lambda i: store.create_tasks_if_idle(
                agents[::-1] if i % 2 else agents, NODE, MODULE, CMD
            ),
        )
        created = Counter(t.agent_id for made, _ in results for t in made)
        assert created == Counter(agents)
        for made, busy in results:
            assert sorted([t.agent_id for t in made] + busy) == agents

    def test_race_update_status(self, store: TaskStore) -> None:
        for agent in range(1, 11):
            create(store, [agent])
            outcomes = _in_threads(
                2, lambda _i, a=agent: store.update_status(a, NODE, TaskStatus.IN_PROGRESS)
            )
            assert sorted(outcomes) == sorted([UPDATE_OK, UPDATE_NOT_FOUND])
            assert len(store.history(store.latest_tasks([agent])[agent].task_id)) == 2

    def test_race_done_against_failed(self, store: TaskStore) -> None:
        for agent in range(1, 9):
            task = task_in(store, agent, TaskStatus.IN_PROGRESS)
            outcomes = _in_threads(
                2,
                lambda i, t=task: store.set_task_status(
                    t.task_id, OTHER if i else None, TaskStatus.DONE if i else TaskStatus.FAILED
                ),
            )
            assert sorted(outcomes) == [False, True]
            assert len(store.history(task.task_id)) == 3

    def test_race_cancel_against_installer_phase(self, store: TaskStore) -> None:
        """``record_phase(PHASE_INSTALLING)`` and a cancel racing: exactly one wins."""
        for agent in range(1, 13):
            task = task_in(store, agent, TaskStatus.IN_PROGRESS)

            def either(i: int, t: Task = task) -> bool:
                if i == 0:
                    return store.record_phase(t.task_id, PHASE_INSTALLING)
                return store.set_task_status(t.task_id, None, TaskStatus.CANCELLED)

            phased, cancelled = _in_threads(2, either)
            assert phased != cancelled, (agent, phased, cancelled)
            fresh = store.get_task(task.task_id)
            assert fresh is not None
            if phased:
                assert fresh.status is TaskStatus.IN_PROGRESS
                assert store.task_phase(task.task_id) == PHASE_INSTALLING
            else:
                assert fresh.status is TaskStatus.CANCELLED
                assert store.interrupted_transfers(NODE) == []

    def test_race_claim_pending(self, store: TaskStore) -> None:
        tasks = create(store, list(range(1, 41)))

        def claim_all(_: int) -> list[int]:
            mine: list[int] = []
            while batch := store.claim_pending(NODE, 3):
                mine.extend(t.task_id for t in batch)
            return mine

        claimed = [tid for got in _in_threads(4, claim_all) for tid in got]
        assert sorted(claimed) == sorted(t.task_id for t in tasks)

    def test_race_create_tasks(self, store: TaskStore) -> None:
        results = _in_threads(6, lambda i: create(store, [i * 100 + k for k in range(20)]))
        ids = [t.task_id for made in results for t in made]
        assert len(set(ids)) == 120
        for made in results:
            assert [t.task_id for t in made] == sorted(t.task_id for t in made)


def _in_threads(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run ``fn(i)`` for i in range(n) in n threads released together; re-raise errors."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    if errors:
        raise errors[0]
    return results


# ---------------------------------------------------------------------- cross-process races


@dataclass(frozen=True)
class StoreSpec:
    """How a worker process builds the store: ``factory`` is ``"module:attr"``, called as
    ``factory(url, config)``."""

    factory: str
    url: str
    config: dict[str, Any] | None = field(default=None)

    def build(self) -> TaskStore:
        module, _, attr = self.factory.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        store: TaskStore = cls(self.url, self.config)
        return store


def _worker(
    spec: StoreSpec, action: str, agents: list[int], barrier: Any, out: Any, node: str = NODE
) -> None:
    store = spec.build()
    store.open()
    try:
        barrier.wait(timeout=60)
        if action == "intake":
            created, busy = store.create_tasks_if_idle(agents, node, MODULE, CMD)
            out.put(("ok", [(t.task_id, t.agent_id) for t in created], busy))
        else:
            claimed: list[int] = []
            while batch := store.claim_pending(node, 4):
                claimed.extend(t.task_id for t in batch)
            out.put(("ok", claimed, [node]))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        out.put(("error", repr(exc), []))
    finally:
        store.close()


def _run_processes(
    spec: StoreSpec, action: str, agents: list[int], n: int, nodes: tuple[str, ...] = (NODE,)
) -> list[Any]:
    # A fork server forks clean children quickly after its first start (no inherited
    # connections, unlike "fork"); "spawn" where it does not exist.
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__, spec.factory.partition(":")[0]])
    else:  # pragma: no cover - Windows
        ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(n)
    out = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker, args=(spec, action, agents, barrier, out, nodes[i % len(nodes)])
        )
        for i in range(n)
    ]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    errors = [r[1] for r in results if r[0] == "error"]
    assert not errors, errors
    return results


class CrossProcessContract:
    """Races between processes; subclass and provide ``store`` and ``store_spec``."""

    processes = 4

    def test_processes_create_if_idle(self, store: TaskStore, store_spec: StoreSpec) -> None:
        agents = list(range(1, 31))
        results = _run_processes(spec=store_spec, action="intake", agents=agents, n=self.processes)
        created = [pair for _, made, _ in results for pair in made]
        assert sorted(agent for _, agent in created) == agents
        assert len({task_id for task_id, _ in created}) == len(agents)
        assert len(store.list_tasks(TaskFilter())) == len(agents)

    def test_processes_claim_pending(self, store: TaskStore, store_spec: StoreSpec) -> None:
        tasks = create(store, list(range(1, 61)))
        results = _run_processes(spec=store_spec, action="claim", agents=[], n=self.processes)
        claimed = [tid for _, got, _ in results for tid in got]
        assert sorted(claimed) == sorted(t.task_id for t in tasks)
        assert store.pending_tasks(NODE) == []
        assert len(store.tasks_in_status(NODE, TaskStatus.IN_PROGRESS)) == len(tasks)

    def test_processes_claim_per_node(self, store: TaskStore, store_spec: StoreSpec) -> None:
        nodes = ("node01", "node02", "node03")
        tasks = {
            n: create(store, list(range(i * 100, i * 100 + 20)), node=n)
            for i, n in enumerate(nodes)
        }
        results = _run_processes(
            spec=store_spec, action="claim", agents=[], n=2 * len(nodes), nodes=nodes
        )
        for node in nodes:
            claimed = [tid for _, got, where in results if where == [node] for tid in got]
            assert sorted(claimed) == [t.task_id for t in tasks[node]]
        assert store.tasks_in_status(None, TaskStatus.PENDING) == []
        for task_list in tasks.values():
            for task in task_list:
                moves = [
                    c for c in store.history(task.task_id) if c.to_status is TaskStatus.IN_PROGRESS
                ]
                assert len(moves) == 1 and moves[0].node == task.node
