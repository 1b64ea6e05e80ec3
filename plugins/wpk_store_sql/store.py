"""``SqlTaskStore``: the task store on SQLite, PostgreSQL or MySQL/MariaDB, chosen by URL.

Every public method runs in its own pooled connection (thread-safe; the kernel calls from a
thread pool) and, when it writes, in one transaction: SQLite ``BEGIN IMMEDIATE`` (writers
serialized), PostgreSQL/MariaDB ``READ COMMITTED`` with row locks (see ``queries.py``).
Deadlocks and serialization failures are replayed a few times; any other database failure
becomes ``TaskError(DATABASE_ERROR)`` with a one-line reason (passwords never shown).
Semantics are those of ``wpk_upgrade.interfaces.TaskStore`` and reference §8.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import peewee as pw
from playhouse.pool import MaxConnectionsExceeded

from wpk_upgrade.errors import PluginError, TaskCode, TaskError
from wpk_upgrade.interfaces import (
    PHASE_INSTALLING,
    PHASE_QUEUED,
    PHASE_TRANSFERRING,
    UPDATE_NOT_FOUND,
    UPDATE_OK,
    TaskFilter,
    TaskStore,
    UpdateOutcome,
)
from wpk_upgrade.models import StatusChange, Task, TaskParams, TaskStatus
from wpk_upgrade.models import now as clock_now

from . import queries as q
from .agents import AgentRegistryMixin
from .migrations import migrate
from .models import (
    StoreModels,
    build_models,
    params_from_json,
    params_json,
    to_change,
    to_task,
)
from .options import SqlStoreOptions, SqlStoreOptionsSchema, coerce_options
from .plumbing import close_quietly, connected, oneline, retryable, transaction
from .urls import SQLITE, DbTarget, build_database, parse, require_driver

log = logging.getLogger(__name__)

R = TypeVar("R")

#: Agents per transaction of ``update_status_many``.
_MANY_CHUNK = 500

PENDING = TaskStatus.PENDING
IN_PROGRESS = TaskStatus.IN_PROGRESS
_ACTIVE = (PENDING.value, IN_PROGRESS.value)
_MAX_RACE_ROUNDS = 20


@dataclass
class _Handle:
    """One opened database: its models, and how many operations are using it."""

    db: pw.Database
    models: StoreModels
    inflight: int = 0
    closing: bool = False
    #: SQLite: the database file and its (device, inode) when opened
    file: Path | None = None
    file_id: tuple[int, int] | None = None
    file_lost: bool = False


def _file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path``, None when it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class SqlTaskStore(AgentRegistryMixin, TaskStore):
    """The fleet's memory in a SQL database (entry points ``sqlite``, ``postgresql``, ``mysql``).

    ``SqlTaskStore(url, config)``: ``url`` as described in ``urls.py``; ``config`` a
    ``SqlStoreOptions``, a dict of its fields, or None for the defaults. No I/O until
    ``open()``, which creates or migrates the schema. Can be closed and opened again.
    """

    name: ClassVar[str] = "sql"
    config_schema = SqlStoreOptionsSchema

    def __init__(self, url: str, config: Any = None) -> None:
        super().__init__(url, config)
        try:
            self.options: SqlStoreOptions = coerce_options(config)
        except Exception as exc:
            raise PluginError(f"invalid SQL task store options: {exc}") from exc
        self.target: DbTarget = parse(url)
        self._cond = threading.Condition()
        self._handle: _Handle | None = None

    def __repr__(self) -> str:
        return f"SqlTaskStore({self.target.display!r})"

    @property
    def dialect(self) -> str:
        """``sqlite``, ``postgresql`` or ``mysql``."""
        return self.target.dialect

    @property
    def _locking(self) -> bool:
        """True when the database takes row locks (``SELECT ... FOR UPDATE``)."""
        return self.target.dialect != SQLITE

    # ------------------------------------------------------------------ lifecycle

    @property
    def _db(self) -> pw.Database | None:
        """The open peewee database (diagnostics and tests), or None."""
        handle = self._handle
        return None if handle is None else handle.db

    def open(self) -> None:
        with self._cond:
            if self._handle is not None:
                return
            require_driver(self.target)
            if self.target.dialect == SQLITE:
                self._prepare_sqlite_file()
            db = build_database(self.target, self.options)
            try:
                with connected(db):
                    found, current = migrate(db, self.target.dialect, self.target.display)
            except PluginError:
                close_quietly(db)
                raise
            except (pw.PeeweeException, MaxConnectionsExceeded, OSError) as exc:
                close_quietly(db)
                raise PluginError(
                    f"cannot open task store {self.target.display}: {oneline(exc)}"
                ) from exc
            if found != current:
                log.info(
                    "task store %s: schema version %d -> %d", self.target.display, found, current
                )
            handle = _Handle(db, build_models(db))
            if self.target.dialect == SQLITE:
                handle.file = Path(self.target.database)
                handle.file_id = _file_id(handle.file)
            self._handle = handle

    def close(self) -> None:
        """Refuse new operations, wait for running ones, then close every connection.

        Connections are never closed under an operation still using them (a SQLite
        connection closed from another thread can crash the interpreter): after
        ``busy_timeout`` seconds, the last straggling operation closes them instead.
        """
        with self._cond:
            handle, self._handle = self._handle, None
            if handle is None:
                return
            handle.closing = True
            self._cond.wait_for(lambda: handle.inflight == 0, self.options.busy_timeout)
            stragglers = handle.inflight
        if stragglers:
            log.warning(
                "task store %s: closing with %d operations still running; their connections "
                "close when they finish",
                self.target.display,
                stragglers,
            )
            handle.db.close_idle()  # type: ignore[attr-defined]
        else:
            close_quietly(handle.db)

    def _prepare_sqlite_file(self) -> None:
        path = Path(self.target.database)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o660)
                os.close(fd)
                os.chmod(path, 0o660)
        except OSError as exc:
            raise PluginError(
                f"cannot create task store file {path}: {exc.strerror or exc}"
            ) from exc

    # ------------------------------------------------------------------ plumbing

    def _enter(self) -> _Handle:
        with self._cond:
            handle = self._handle
            if handle is None:
                raise TaskError(TaskCode.DATABASE_ERROR, "the task store is not open")
            if handle.file is not None and _file_id(handle.file) != handle.file_id:
                # Deleted or replaced under us: what we wrote would be lost at the next start.
                detail = (
                    f"task store file {handle.file} was removed or replaced while open; "
                    "restore it or restart the manager"
                )
                if not handle.file_lost:
                    handle.file_lost = True
                    log.error("%s", detail)
                raise TaskError(TaskCode.DATABASE_ERROR, detail)
            handle.inflight += 1
            return handle

    def _leave(self, handle: _Handle) -> None:
        with self._cond:
            handle.inflight -= 1
            last_straggler = handle.closing and handle.inflight == 0
            self._cond.notify_all()
        if last_straggler and self._handle is not handle:
            close_quietly(handle.db)

    def _run(
        self,
        what: str,
        fn: Callable[[StoreModels], R],
        *,
        write: bool = True,
        prepare: Callable[[StoreModels], None] | None = None,
    ) -> R:
        """Run ``fn`` in a pooled connection (and a transaction when ``write``).

        ``prepare`` runs first, outside the transaction. Deadlocks, serialization failures
        and ``queries.Raced`` replay everything; other errors become ``TaskError``.
        """
        handle = self._enter()
        try:
            return self._attempts(what, handle, fn, write, prepare)
        finally:
            self._leave(handle)

    def _attempts(
        self,
        what: str,
        handle: _Handle,
        fn: Callable[[StoreModels], R],
        write: bool,
        prepare: Callable[[StoreModels], None] | None,
    ) -> R:
        db, m = handle.db, handle.models
        attempts = self.options.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                with connected(db):
                    if prepare is not None:
                        prepare(m)
                    if not write:
                        return fn(m)
                    with transaction(db, self.target.dialect):
                        return fn(m)
            except (pw.PeeweeException, q.Raced, MaxConnectionsExceeded) as exc:
                if attempt < attempts and retryable(exc):
                    log.debug("task store: %s: retrying after %s", what, oneline(exc))
                    time.sleep(random.uniform(0.002, 0.02) * attempt)
                    continue
                raise TaskError(TaskCode.DATABASE_ERROR, f"{what}: {oneline(exc)}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ tasks: creation

    def create_tasks(
        self,
        agent_ids: Sequence[int],
        node: str,
        module: str,
        command: str,
        params: TaskParams | None = None,
        now: int | None = None,
    ) -> list[Task]:
        when = _now(now)
        agents = list(agent_ids)
        if not agents:
            return []
        pjson = params_json(params)

        def op(m: StoreModels) -> list[Task]:
            tasks = q.insert_tasks(m, agents, node, module, command, pjson, when)
            q.add_history(m, [q.created_entry(t) for t in tasks])
            return tasks

        return self._run("create tasks", op)

    def create_tasks_if_idle(
        self,
        agent_ids: Sequence[int],
        node: str,
        module: str,
        command: str,
        params: TaskParams | None = None,
        now: int | None = None,
    ) -> tuple[list[Task], list[int]]:
        """Create Pending tasks only for agents with no active task, atomically.

        A latest Pending task of another node is deleted first (as ``get_status`` does).
        An agent id repeated in the request is busy after its first task is created.
        Returns (created tasks in request order, busy agent ids in request order).
        """
        when = _now(now)
        agents = [int(a) for a in agent_ids]
        if not agents:
            return [], []
        unique = sorted(set(agents))
        pjson = params_json(params)

        def prepare(m: StoreModels) -> None:
            if self._locking:
                q.ensure_lock_rows(m, unique)

        def op(m: StoreModels) -> tuple[list[Task], list[int]]:
            if self._locking:
                q.lock_agents(m, unique)
            latest = q.latest_rows(m, unique)
            idle: list[int] = []
            busy: list[int] = []
            done: set[int] = set()
            for agent in agents:
                if agent in done or not self._idle_for(m, latest.get(agent), node, when):
                    busy.append(agent)
                    continue
                idle.append(agent)
                done.add(agent)
            created = q.insert_tasks(m, idle, node, module, command, pjson, when)
            q.add_history(m, [q.created_entry(t) for t in created])
            return created, busy

        return self._run("create tasks", op, prepare=prepare)

    def _idle_for(self, m: StoreModels, row: Any, node: str, when: int) -> bool:
        """True when a new task may be created for the agent whose latest row is ``row``.

        The agent is locked by the caller (no other intake for it runs), but status changes
        (a claim, a cancel) still may: when the deletion of another node's Pending task
        finds it changed, the fresh row decides.
        """
        if row is None:
            return True
        status = TaskStatus(row.status)
        if status is PENDING and row.node != node:
            if q.delete_foreign_pending(m, row, node, when):
                return True
            fresh = q.latest_row(m, row.agent_id)
            return fresh is None or not TaskStatus(fresh.status).active
        return not status.active

    # ------------------------------------------------------------------ tasks: status

    def get_status(self, agent_id: int, node: str) -> TaskStatus | None:
        row = self._run("get status", lambda m: q.latest_row(m, agent_id), write=False)
        if row is None:
            return None
        status = TaskStatus(row.status)
        if status is not PENDING or row.node == node:
            return status
        when = clock_now()

        def prepare(m: StoreModels) -> None:
            if self._locking:
                q.ensure_lock_rows(m, [agent_id])

        def op(m: StoreModels) -> TaskStatus | None:
            if self._locking:
                q.lock_agents(m, [agent_id])
            latest = q.latest_row(m, agent_id)
            if latest is None:
                return None
            current = TaskStatus(latest.status)
            if current is PENDING and latest.node != node:
                if q.delete_foreign_pending(m, latest, node, when):
                    return None
                latest = q.latest_row(m, agent_id)
                return None if latest is None else TaskStatus(latest.status)
            return current

        return self._run("get status", op, prepare=prepare)

    def update_status(
        self,
        agent_id: int,
        node: str | None,
        status: TaskStatus,
        error_msg: str | None = None,
        reason: str | None = None,
        now: int | None = None,
    ) -> UpdateOutcome:
        when = _now(now)

        def op(m: StoreModels) -> bool:
            for _ in range(_MAX_RACE_ROUNDS):
                row = q.latest_row(m, agent_id)
                if row is None:
                    return False
                outcome = q.move(m, row, status, node, error_msg, reason, when)
                if outcome is not q.Outcome.RACED:
                    return outcome is q.Outcome.MOVED
            raise q.Raced(f"agent {agent_id}: latest task kept changing")

        moved = self._run("update status", op)
        return UPDATE_OK if moved else UPDATE_NOT_FOUND

    def update_status_many(
        self,
        agent_ids: Sequence[int],
        node: str | None,
        status: TaskStatus,
        error_msg: str | None = None,
        reason: str | None = None,
        now: int | None = None,
    ) -> dict[int, Task]:
        when = _now(now)
        wanted = list(dict.fromkeys(int(a) for a in agent_ids))
        moved: dict[int, Task] = {}
        for part in q.chunks(wanted, _MANY_CHUNK):

            def op(m: StoreModels, part: list[int] = part) -> dict[int, Task]:
                return q.move_latest_many(m, part, status, node, error_msg, reason, when)

            moved.update(self._run("update status of many agents", op))
        return moved

    def set_task_status(
        self,
        task_id: int,
        node: str | None,
        status: TaskStatus,
        error_msg: str | None = None,
        reason: str | None = None,
        now: int | None = None,
    ) -> bool:
        when = _now(now)

        def op(m: StoreModels) -> bool:
            for _ in range(_MAX_RACE_ROUNDS):
                row = m.task.get_or_none(m.task.task_id == task_id)
                if row is None:
                    return False
                outcome = q.move(m, row, status, node, error_msg, reason, when)
                if outcome is not q.Outcome.RACED:
                    return outcome is q.Outcome.MOVED
            raise q.Raced(f"task {task_id} kept changing")

        return self._run("set task status", op)

    def claim_pending(
        self,
        node: str,
        limit: int,
        now: int | None = None,
        skip_agents: Collection[int] = (),
    ) -> list[Task]:
        """Atomically move up to ``limit`` Pending tasks of ``node`` to In progress.

        Oldest first; only tasks stored with parameters; none of ``skip_agents``.
        PostgreSQL/MariaDB: ``SELECT ... FOR UPDATE SKIP LOCKED``, so claimers on several
        processes or nodes never wait for each other nor claim a task twice; SQLite:
        ``BEGIN IMMEDIATE``. A read probe first keeps an idle poll out of the write lock.
        """
        when = _now(now)
        if limit <= 0:
            return []
        skip = sorted({int(a) for a in skip_agents})

        def pick(m: StoreModels) -> Any:
            t = m.task
            cond = (t.node == node) & (t.status == PENDING.value) & t.params.is_null(False)
            if skip:
                cond &= t.agent_id.not_in(skip)
            return t.select().where(cond).order_by(t.create_time, t.task_id)

        if not self._run("claim probe", lambda m: pick(m).limit(1).exists(), write=False):
            return []

        def op(m: StoreModels) -> list[Task]:
            query = pick(m).limit(limit)
            if self._locking:
                query = query.for_update(skip_locked=True)
            rows = list(query)
            moved = q.move_locked(m, rows, PENDING, IN_PROGRESS, node, "claimed", when)
            return [q.moved_task(r, IN_PROGRESS, when) for r in moved]

        return self._run("claim pending tasks", op)

    def cancel_pending(self, node: str, now: int | None = None) -> int:
        when = _now(now)

        def op(m: StoreModels) -> int:
            t = m.task
            pick = t.select().where((t.node == node) & (t.status == PENDING.value))
            rows = list(pick.for_update() if self._locking else pick)
            moved = q.move_locked(
                m, rows, PENDING, TaskStatus.CANCELLED, None, "manager restarted", when
            )
            return len(moved)

        return self._run("cancel pending tasks", op)

    def expire(self, now: int, task_timeout: int) -> tuple[int, int]:
        def op(m: StoreModels) -> tuple[int, int]:
            t = m.task
            since = pw.fn.COALESCE(t.update_time, t.create_time)
            pick = t.select().where((t.status == IN_PROGRESS.value) & (since <= now - task_timeout))
            rows = list(pick.for_update() if self._locking else pick)
            moved = q.move_locked(
                m, rows, IN_PROGRESS, TaskStatus.TIMEOUT, None, "task_timeout reached", now
            )
            oldest = t.select(pw.fn.MIN(since)).where(t.status == IN_PROGRESS.value).scalar()
            deadline = now + task_timeout if oldest is None else int(oldest) + task_timeout
            return len(moved), deadline

        return self._run("expire tasks", op)

    # ------------------------------------------------------------------ tasks: cleanup

    def delete_old(self, before: int) -> int:
        def op(m: StoreModels) -> int:
            t = m.task
            return int(
                t.delete().where((t.create_time <= before) & t.status.not_in(_ACTIVE)).execute()
            )

        return self._run("delete old tasks", op)

    def delete_history_before(self, before: int) -> int:
        """Delete history rows recorded at or before ``before`` whose task no longer exists.

        ``delete_old`` keeps history so that "what happened to agent N" stays answerable;
        this is the separate retention knob. Returns how many rows went.
        """

        def op(m: StoreModels) -> int:
            h, t = m.history, m.task
            gone = ~pw.fn.EXISTS(t.select(t.task_id).where(t.task_id == h.task_id))
            return int(h.delete().where((h.change_time <= before) & gone).execute())

        return self._run("delete old history", op)

    # ------------------------------------------------------------------ tasks: phases

    def record_phase(self, task_id: int, phase: str, now: int | None = None) -> bool:
        """One phase row in the history (``In progress -> In progress``, ``extra.phase``),
        written only while the task is In progress (row locked on PostgreSQL/MariaDB)."""
        when = _now(now)

        def op(m: StoreModels) -> bool:
            t = m.task
            query = t.select(t.task_id, t.node, t.status).where(t.task_id == task_id)
            row = (query.for_update() if self._locking else query).get_or_none()
            if row is None or row.status != IN_PROGRESS.value:
                return False
            q.add_history(m, [q.phase_entry(task_id, phase, when, row.node)])
            return True

        return self._run("record phase", op)

    def task_phase(self, task_id: int) -> str | None:
        def op(m: StoreModels) -> str | None:
            t = m.task
            status = t.select(t.status).where(t.task_id == task_id).scalar()
            if status == PENDING.value:
                return PHASE_QUEUED
            if status != IN_PROGRESS.value:
                return None
            h = m.history
            extra = (
                h.select(h.extra)
                .where((h.task_id == task_id) & q.is_phase_row(h))
                .order_by(h.id.desc())
                .limit(1)
                .scalar()
            )
            return q.phase_of(extra) or PHASE_TRANSFERRING

        return self._run("task phase", op, write=False)

    def interrupted_transfers(self, node: str) -> list[Task]:
        def op(m: StoreModels) -> list[Task]:
            t, h = m.task, m.history
            installing = h.select(h.id).where(
                (h.task_id == t.task_id) & (h.extra == q.phase_extra(PHASE_INSTALLING))
            )
            query = (
                t.select()
                .where(
                    (t.node == node)
                    & (t.status == IN_PROGRESS.value)
                    & t.params.is_null(False)
                    & ~pw.fn.EXISTS(installing)
                )
                .order_by(t.task_id)
            )
            return [to_task(r) for r in query]

        return self._run("interrupted transfers", op, write=False)

    # ------------------------------------------------------------------ tasks: reading

    def get_task(self, task_id: int) -> Task | None:
        def op(m: StoreModels) -> Task | None:
            row = m.task.get_or_none(m.task.task_id == task_id)
            return None if row is None else to_task(row)

        return self._run("get task", op, write=False)

    def latest_tasks(self, agent_ids: Sequence[int]) -> dict[int, Task]:
        if not agent_ids:
            return {}

        def op(m: StoreModels) -> dict[int, Task]:
            return q.latest_rows(m, agent_ids)

        return self._run("latest tasks", op, write=False)

    def task_params(self, task_id: int) -> TaskParams | None:
        def op(m: StoreModels) -> TaskParams | None:
            t = m.task
            text = t.select(t.params).where(t.task_id == task_id).scalar()
            return params_from_json(text)

        return self._run("task params", op, write=False)

    def pending_tasks(self, node: str, limit: int = 1000) -> list[Task]:
        def op(m: StoreModels) -> list[Task]:
            t = m.task
            query = (
                t.select()
                .where((t.node == node) & (t.status == PENDING.value))
                .order_by(t.create_time, t.task_id)
            )
            if limit > 0:
                query = query.limit(limit)
            return [to_task(r) for r in query]

        return self._run("pending tasks", op, write=False)

    def tasks_in_status(self, node: str | None, status: TaskStatus) -> list[Task]:
        def op(m: StoreModels) -> list[Task]:
            t = m.task
            cond = t.status == TaskStatus(status).value
            if node is not None:
                cond &= t.node == node
            return [to_task(r) for r in t.select().where(cond).order_by(t.task_id)]

        return self._run("tasks in status", op, write=False)

    def set_progress(self, task_id: int, sent: int, total: int) -> None:
        def op(m: StoreModels) -> None:
            t = m.task
            t.update(bytes_sent=sent, bytes_total=total).where(t.task_id == task_id).execute()

        self._run("set progress", op, write=False)

    def history(self, task_id: int) -> list[StatusChange]:
        def op(m: StoreModels) -> list[StatusChange]:
            h = m.history
            rows = h.select().where((h.task_id == task_id) & ~q.is_phase_row(h)).order_by(h.id)
            return [to_change(r) for r in rows]

        return self._run("task history", op, write=False)

    def list_tasks(self, flt: TaskFilter) -> list[Task]:
        """Tasks matching ``flt``, newest first (create_time, then task id, descending).

        ``since``/``until`` bound ``create_time`` (inclusive); ``limit`` <= 0 means no limit.
        """
        if flt.agent_ids is not None and not flt.agent_ids:
            return []
        groups: list[Sequence[int] | None]
        groups = [None] if flt.agent_ids is None else list(q.chunks(sorted(set(flt.agent_ids))))

        def op(m: StoreModels) -> list[Task]:
            t = m.task
            found: list[Task] = []
            for group in groups:
                cond = q.filter_condition(t, flt)
                if group is not None:
                    cond &= t.agent_id.in_(list(group))
                query = t.select().where(cond).order_by(t.create_time.desc(), t.task_id.desc())
                if flt.limit > 0:
                    query = query.limit(flt.limit)
                found.extend(to_task(r) for r in query)
            found.sort(key=lambda k: (k.create_time, k.task_id), reverse=True)
            return found[: flt.limit] if flt.limit > 0 else found

        return self._run("list tasks", op, write=False)

    def bulk_load(self, tasks: Iterable[Task], batch: int = 1000) -> int:
        """Insert many tasks as they are (ids ignored, no history rows): benchmarks, imports.

        One multi-row INSERT per ``batch`` tasks (at most 1000), each in its own transaction.
        Returns how many rows were inserted.
        """
        batch = max(1, min(batch, 1000))  # SQLite: at most 32766 bound parameters
        p = "?" if self.target.dialect == SQLITE else "%s"
        row_sql = "(" + ", ".join([p] * len(q.BULK_COLUMNS)) + ")"
        prefix = f"INSERT INTO tasks ({', '.join(q.BULK_COLUMNS)}) VALUES "

        def flush(rows: list[tuple[Any, ...]]) -> int:
            sql = prefix + ", ".join([row_sql] * len(rows))
            values = [v for row in rows for v in row]

            def op(m: StoreModels) -> int:
                db = m.task._meta.database
                if self.target.dialect == SQLITE:  # sqlite3's executemany is the fastest
                    cursor = db.cursor()
                    try:
                        cursor.executemany(prefix + row_sql, rows)
                    finally:
                        cursor.close()
                else:
                    db.execute_sql(sql, values)
                return len(rows)

            return self._run("bulk load tasks", op)

        total = 0
        pending: list[tuple[Any, ...]] = []
        for task in tasks:
            pending.append(q.task_values(task))
            if len(pending) >= batch:
                total += flush(pending)
                pending = []
        if pending:
            total += flush(pending)
        return total


def _now(value: int | None) -> int:
    return clock_now() if value is None else int(value)
