"""Query building blocks of the SQL task store; each runs inside the caller's transaction.

Race safety, the same on every database:

* a status change is a conditional ``UPDATE ... WHERE task_id = ? AND status = <expected>``;
  a writer that loses a race sees 0 rows and re-reads (``Outcome.RACED``);
* bulk changes (claim, cancel, expire) first select their rows ``FOR UPDATE`` (PostgreSQL,
  MariaDB; SQLite writers are already serialized by ``BEGIN IMMEDIATE``), and a row count
  that does not match raises ``Raced`` so the whole transaction is replayed;
* per-agent intake (``create_tasks_if_idle``, the other-node Pending deletion) locks the
  agent's ``agent_locks`` row, in agent id order, before reading its latest task.
"""

from __future__ import annotations

import enum
import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import peewee as pw

from wpk_upgrade.interfaces import PHASE_INSTALLING, TaskFilter
from wpk_upgrade.models import Task, TaskStatus, check_transition

from .models import StoreModels, task_from_values, to_task

CHUNK = 500  # ids per IN (...) list: well below SQLite's bound-parameter limit

T = TypeVar("T")


class Raced(Exception):
    """Rows changed under a bulk update that had locked them: replay the transaction."""


class Outcome(enum.Enum):
    """Result of one conditional status change."""

    MOVED = "moved"
    REFUSED = "refused"  # the transition table says no
    RACED = "raced"  # another writer changed the row first; re-read and decide again


def chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    """``items`` in slices of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def latest_row(m: StoreModels, agent_id: int) -> Any | None:
    """The agent's latest task row: highest create_time, then highest task_id."""
    t = m.task
    return (
        t.select()
        .where(t.agent_id == agent_id)
        .order_by(t.create_time.desc(), t.task_id.desc())
        .limit(1)
        .get_or_none()
    )


#: Columns of a bulk read, in ``task_from_values`` order (the ``Task`` fields).
TASK_FIELDS = (
    "task_id",
    "agent_id",
    "node",
    "module",
    "command",
    "status",
    "create_time",
    "update_time",
    "error_msg",
    "bytes_sent",
    "bytes_total",
)
_TUPLE_COLUMNS = ", ".join(TASK_FIELDS)


def latest_rows(m: StoreModels, agent_ids: Iterable[int]) -> dict[int, Task]:
    """Latest task row per agent (highest create_time, then task id), ``CHUNK`` agents a query.

    One (agent_id, create_time, task_id) index probe per agent: PostgreSQL ``LATERAL`` over
    the ids as one array parameter, SQLite over ``json_each`` of the ids as one JSON text
    parameter (3.38+; a ``VALUES`` list of ``CHUNK`` ids before). MySQL/MariaDB: newest
    create_time per agent by ``GROUP BY`` (a loose index scan there), the highest task id
    among rows sharing it. Rows are read as tuples, without the ORM, straight into ``Task``s
    (which callers read like rows: ``task_id``, ``agent_id``, ``node``, ``status``).
    """
    db = m.task._meta.database
    wanted = sorted({int(a) for a in agent_ids})
    if not wanted:
        return {}
    if isinstance(db, pw.PostgresqlDatabase):
        return _rows_by_agent(db.execute_sql(_LATEST_LATERAL, (wanted,)).fetchall())
    if isinstance(db, pw.SqliteDatabase) and sqlite3.sqlite_version_info >= (3, 38, 0):
        return _rows_by_agent(db.execute_sql(_LATEST_JSON, (json.dumps(wanted),)).fetchall())
    found: dict[int, Task] = {}
    for chunk in chunks(wanted):
        if isinstance(db, pw.MySQLDatabase):
            found.update(_latest_grouped(m, chunk))
        else:
            found.update(_latest_probed(db, chunk))
    return found


_LATEST_LATERAL = (
    f"SELECT {', '.join('t.' + c for c in TASK_FIELDS)} FROM unnest(%s::bigint[]) a(id)"
    " CROSS JOIN LATERAL (SELECT * FROM tasks WHERE agent_id = a.id"
    " ORDER BY create_time DESC, task_id DESC LIMIT 1) t"
)
_LATEST_JSON = (
    f"SELECT {_TUPLE_COLUMNS} FROM tasks WHERE task_id IN (SELECT (SELECT t.task_id"
    " FROM tasks t WHERE t.agent_id = j.value ORDER BY t.create_time DESC, t.task_id DESC"
    " LIMIT 1) FROM json_each(?) j)"
)


def _rows_by_agent(rows: Iterable[Sequence[Any]]) -> dict[int, Task]:
    found = (task_from_values(r) for r in rows)
    return {task.agent_id: task for task in found}


def _latest_probed(db: pw.Database, chunk: Sequence[int]) -> dict[int, Task]:
    values = ", ".join(f"({db.param})" for _ in chunk)
    sql = (
        f"WITH ids (agent_id) AS (VALUES {values}) "
        f"SELECT {_TUPLE_COLUMNS} FROM tasks WHERE task_id IN ("
        " SELECT (SELECT t.task_id FROM tasks t WHERE t.agent_id = ids.agent_id"
        "  ORDER BY t.create_time DESC, t.task_id DESC LIMIT 1) FROM ids)"
    )
    return _rows_by_agent(db.execute_sql(sql, list(chunk)).fetchall())


def _latest_grouped(m: StoreModels, chunk: Sequence[int]) -> dict[int, Task]:
    t = m.task
    newest = (
        t.select(t.agent_id, pw.fn.MAX(t.create_time).alias("newest"))
        .where(t.agent_id.in_(list(chunk)))
        .group_by(t.agent_id)
        .alias("newest")
    )
    columns = [getattr(t, name) for name in TASK_FIELDS]
    query = (
        t.select(*columns)
        .join(newest, on=((t.agent_id == newest.c.agent_id) & (t.create_time == newest.c.newest)))
        .tuples()
    )
    found: dict[int, Task] = {}
    for values in query:
        row = task_from_values(values)
        best = found.get(row.agent_id)
        if best is None or row.task_id > best.task_id:
            found[row.agent_id] = row
    return found


def history_entry(
    task_id: int,
    from_status: TaskStatus | None,
    to_status: TaskStatus,
    when: int,
    node: str,
    reason: str | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Column values of one ``task_history`` row."""
    return {
        "task_id": task_id,
        "from_status": None if from_status is None else from_status.value,
        "to_status": to_status.value,
        "change_time": when,
        "node": node,
        "reason": reason,
        "extra": json.dumps(extra, sort_keys=True) if extra else None,
    }


def phase_extra(phase: str) -> str:
    """The ``extra`` text of a phase row (exact text: phase rows are found by it)."""
    return json.dumps({"phase": phase}, sort_keys=True)


def phase_entry(task_id: int, phase: str, when: int, node: str) -> dict[str, Any]:
    """A phase row: In progress -> In progress, ``extra.phase`` (not a status change)."""
    status = TaskStatus.IN_PROGRESS
    entry = history_entry(task_id, status, status, when, node, f"phase {phase}")
    entry["extra"] = phase_extra(phase)
    return entry


def installer_started(m: StoreModels, task_id: int, status: TaskStatus) -> bool | None:
    """True when the task's ``PHASE_INSTALLING`` row exists; None when the task is no longer
    in ``status`` (re-read and decide again).

    Atomic with ``record_phase`` (which writes that row only while the task is In progress):
    on PostgreSQL/MariaDB the task row is locked ``FOR UPDATE`` first, as ``record_phase``
    does, so the phase row is read only once a concurrent ``record_phase`` has committed (a
    READ COMMITTED statement started after the lock sees it); SQLite writers are serialized
    by ``BEGIN IMMEDIATE``. The caller's status change then runs in the same transaction.
    """
    t, h = m.task, m.history
    query = t.select(t.status).where(t.task_id == task_id)
    if not isinstance(t._meta.database, pw.SqliteDatabase):
        query = query.for_update()
    current = query.scalar()
    if current != status.value:
        return None
    phase = h.select(h.id).where(
        (h.task_id == task_id) & (h.extra == phase_extra(PHASE_INSTALLING)) & is_phase_row(h)
    )
    return bool(phase.exists())


def is_phase_row(h: Any) -> Any:
    """Condition: a history row that records a phase, not a transition (from == to)."""
    return h.from_status.is_null(False) & (h.from_status == h.to_status)


def phase_of(extra: str | None) -> str | None:
    """The phase named by a phase row's ``extra`` text."""
    if not extra:
        return None
    value = json.loads(extra).get("phase")
    return value if isinstance(value, str) else None


HISTORY_COLUMNS = ("task_id", "from_status", "to_status", "change_time", "node", "reason", "extra")
TASK_COLUMNS = (
    "agent_id",
    "node",
    "module",
    "command",
    "status",
    "create_time",
    "update_time",
    "error_msg",
    "params",
    "bytes_sent",
    "bytes_total",
)


def _insert_sql(db: pw.Database, table: str, columns: Sequence[str], rows: int) -> str:
    """``INSERT INTO table (columns) VALUES (...), ...`` for ``rows`` rows of parameters."""
    one = "(" + ", ".join([db.param] * len(columns)) + ")"
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES " + ", ".join([one] * rows)


def _returning(db: pw.Database) -> bool:
    """True when ``INSERT ... RETURNING`` works here (PostgreSQL, SQLite 3.35+)."""
    if isinstance(db, pw.PostgresqlDatabase):
        return True
    if isinstance(db, pw.SqliteDatabase):
        return sqlite3.sqlite_version_info >= (3, 35, 0)
    return False


def add_history(m: StoreModels, entries: Sequence[dict[str, Any]]) -> None:
    """Insert history rows: one multi-row statement per 500 (built once, no ORM per row)."""
    db = m.history._meta.database
    for chunk in chunks(entries, CHUNK):
        values = [e[c] for e in chunk for c in HISTORY_COLUMNS]
        db.execute_sql(_insert_sql(db, "task_history", HISTORY_COLUMNS, len(chunk)), values)


def move(
    m: StoreModels,
    row: Any,
    new: TaskStatus,
    actor: str | None,
    error_msg: str | None,
    reason: str | None,
    when: int,
) -> Outcome:
    """Move one task row to ``new`` if ``check_transition`` allows it (conditional UPDATE).

    In progress -> Cancelled is also refused once the task's installer phase is recorded
    (``installer_started``): from then on the agent may be installing.
    """
    current = TaskStatus(row.status)
    if not check_transition(current, new, row.node, actor):
        return Outcome.REFUSED
    if current is TaskStatus.IN_PROGRESS and new is TaskStatus.CANCELLED:
        started = installer_started(m, row.task_id, current)
        if started is None:
            return Outcome.RACED
        if started:
            return Outcome.REFUSED
    t = m.task
    changed = (
        t.update(status=new.value, update_time=when, error_msg=error_msg)
        .where((t.task_id == row.task_id) & (t.status == current.value))
        .execute()
    )
    if changed != 1:
        return Outcome.RACED
    node = actor if actor is not None else row.node
    add_history(m, [history_entry(row.task_id, current, new, when, node, reason)])
    return Outcome.MOVED


def move_latest_many(
    m: StoreModels,
    agent_ids: Sequence[int],
    new: TaskStatus,
    actor: str | None,
    error_msg: str | None,
    reason: str | None,
    when: int,
) -> dict[int, Task]:
    """``move`` of the latest task of each agent, in a few statements: the latest rows in one
    query, one conditional UPDATE per current status, the history in one insert. Returns
    the moved tasks (old values) by agent. Raises ``Raced`` when a row changed meanwhile
    (the caller replays the whole transaction). In progress -> Cancelled goes through
    ``move`` one by one (its installer-phase check)."""
    latest = latest_rows(m, agent_ids)
    groups: dict[TaskStatus, list[Task]] = {}
    moved: dict[int, Task] = {}
    for agent, task in latest.items():
        current = TaskStatus(task.status)
        if not check_transition(current, new, task.node, actor):
            continue
        if current is TaskStatus.IN_PROGRESS and new is TaskStatus.CANCELLED:
            row = latest_row(m, agent)
            if row is None or row.task_id != task.task_id:
                raise Raced(f"agent {agent}: latest task changed")
            outcome = move(m, row, new, actor, error_msg, reason, when)
            if outcome is Outcome.RACED:
                raise Raced(f"agent {agent}: task {task.task_id} changed")
            if outcome is Outcome.MOVED:
                moved[agent] = task
            continue
        groups.setdefault(current, []).append(task)
    t = m.task
    entries: list[dict[str, Any]] = []
    for current, tasks in groups.items():
        for part in chunks([task.task_id for task in tasks]):
            changed = (
                t.update(status=new.value, update_time=when, error_msg=error_msg)
                .where(t.task_id.in_(part) & (t.status == current.value))
                .execute()
            )
            if changed != len(part):
                raise Raced(f"{len(part) - changed} of {len(part)} tasks changed meanwhile")
        for task in tasks:
            node = actor if actor is not None else task.node
            entries.append(history_entry(task.task_id, current, new, when, node, reason))
            moved[task.agent_id] = task
    if entries:
        add_history(m, entries)
    return moved


def move_locked(
    m: StoreModels,
    rows: Sequence[Any],
    current: TaskStatus,
    new: TaskStatus,
    actor: str | None,
    reason: str,
    when: int,
) -> list[Any]:
    """Move rows already locked by this transaction (all in ``current``) to ``new``.

    Rows the transition table refuses are skipped. Returns the moved rows (old values).
    """
    allowed = [r for r in rows if check_transition(current, new, r.node, actor)]
    t = m.task
    for chunk in chunks(allowed):
        ids = [r.task_id for r in chunk]
        changed = (
            t.update(status=new.value, update_time=when, error_msg=None)
            .where(t.task_id.in_(ids) & (t.status == current.value))
            .execute()
        )
        if changed != len(ids):
            raise Raced(f"{len(ids) - changed} of {len(ids)} locked tasks changed underneath")
    add_history(
        m,
        [
            history_entry(r.task_id, current, new, when, actor if actor else r.node, reason)
            for r in allowed
        ],
    )
    return allowed


def _id_groups(db: pw.Database, ids: Sequence[int]) -> Iterator[tuple[str, list[Any]]]:
    """(``agent_id`` condition, parameters) covering ``ids``: one ``= ANY(array)`` on
    PostgreSQL, ``IN (...)`` lists of ``CHUNK`` ids elsewhere."""
    if isinstance(db, pw.PostgresqlDatabase):
        yield "agent_id = ANY(%s::int[])", [list(ids)]
        return
    for chunk in chunks(ids):
        yield f"agent_id IN ({', '.join([db.param] * len(chunk))})", list(chunk)


def ensure_lock_rows(m: StoreModels, agent_ids: Sequence[int]) -> None:
    """Create missing ``agent_locks`` rows, outside any transaction (autocommit).

    Done before the transaction so that the transaction only ever takes row locks with
    ``SELECT ... FOR UPDATE`` in id order: no insert-lock interleaving, no deadlock.
    """
    db = m.agent_lock._meta.database
    have: set[int] = set()
    for cond, params in _id_groups(db, agent_ids):
        rows = db.execute_sql(f"SELECT agent_id FROM agent_locks WHERE {cond}", params)
        have.update(int(r[0]) for r in rows.fetchall())
    missing = [a for a in agent_ids if a not in have]
    ignore = "INSERT IGNORE INTO" if isinstance(db, pw.MySQLDatabase) else "INSERT INTO"
    conflict = "" if isinstance(db, pw.MySQLDatabase) else " ON CONFLICT DO NOTHING"
    for chunk in chunks(missing):
        marks = ", ".join([f"({db.param})"] * len(chunk))
        db.execute_sql(f"{ignore} agent_locks (agent_id) VALUES {marks}{conflict}", list(chunk))


def lock_agents(m: StoreModels, agent_ids: Sequence[int]) -> None:
    """Lock the agents' ``agent_locks`` rows (ids sorted) until the transaction ends."""
    db = m.agent_lock._meta.database
    for cond, params in _id_groups(db, sorted(agent_ids)):
        sql = f"SELECT agent_id FROM agent_locks WHERE {cond} ORDER BY agent_id FOR UPDATE"
        db.execute_sql(sql, params).fetchall()


def delete_foreign_pending(m: StoreModels, row: Any, node: str, when: int) -> bool:
    """Delete a Pending task of another node (reference §8.3); records a history row.

    The history row says Pending -> Cancelled with ``extra.deleted`` true, since the task
    row itself is gone. False when the task was no longer Pending (someone claimed it).
    """
    t = m.task
    deleted = (
        t.delete()
        .where((t.task_id == row.task_id) & (t.status == TaskStatus.PENDING.value))
        .execute()
    )
    if deleted != 1:
        return False
    reason = f"deleted: Pending on node {row.node}, status asked by node {node}"
    extra = {"deleted": True, "task_node": row.node}
    entry = history_entry(
        row.task_id, TaskStatus.PENDING, TaskStatus.CANCELLED, when, node, reason, extra
    )
    add_history(m, [entry])
    return True


def insert_tasks(
    m: StoreModels,
    agent_ids: Sequence[int],
    node: str,
    module: str,
    command: str,
    pjson: str | None,
    when: int,
) -> list[Task]:
    """Insert one Pending task row per agent (repeats allowed), ids ascending in order.

    PostgreSQL and SQLite 3.35+: one multi-row ``INSERT ... RETURNING task_id`` per 500
    rows (the ids of one statement are handed out in row order, so sorted they match the
    rows); MySQL/MariaDB and older SQLite: one INSERT per row and its ``lastrowid``.
    """
    db = m.task._meta.database
    pending = TaskStatus.PENDING.value
    rows = [(a, node, module, command, pending, when, None, None, pjson, 0, 0) for a in agent_ids]
    ids: list[int] = []
    if _returning(db):
        for chunk in chunks(rows, CHUNK):
            sql = _insert_sql(db, "tasks", TASK_COLUMNS, len(chunk)) + " RETURNING task_id"
            cursor = db.execute_sql(sql, [v for row in chunk for v in row])
            ids.extend(sorted(int(r[0]) for r in cursor.fetchall()))
    else:
        sql = _insert_sql(db, "tasks", TASK_COLUMNS, 1)
        ids = [int(db.execute_sql(sql, row).lastrowid) for row in rows]
    if len(ids) != len(rows):
        raise Raced(f"inserted {len(ids)} of {len(rows)} tasks")
    return [
        Task(i, int(a), node, module, command, TaskStatus.PENDING, when)
        for i, a in zip(ids, agent_ids, strict=True)
    ]


def created_entry(task: Task) -> dict[str, Any]:
    """The None -> Pending history row of a new task."""
    return history_entry(
        task.task_id, None, TaskStatus.PENDING, task.create_time, task.node, "created"
    )


def moved_task(row: Any, status: TaskStatus, when: int) -> Task:
    """The ``Task`` a row became after a bulk move to ``status`` at ``when``."""
    task = to_task(row)
    return Task(
        task.task_id,
        task.agent_id,
        task.node,
        task.module,
        task.command,
        status,
        task.create_time,
        when,
        None,
        task.bytes_sent,
        task.bytes_total,
    )


BULK_COLUMNS = (
    "agent_id",
    "node",
    "module",
    "command",
    "status",
    "create_time",
    "update_time",
    "error_msg",
    "bytes_sent",
    "bytes_total",
)


def task_values(task: Task) -> tuple[Any, ...]:
    """``BULK_COLUMNS`` values of a task (``bulk_load``)."""
    return (
        task.agent_id,
        task.node,
        task.module,
        task.command,
        TaskStatus(task.status).value,
        task.create_time,
        task.update_time,
        task.error_msg,
        task.bytes_sent,
        task.bytes_total,
    )


def filter_condition(t: Any, flt: TaskFilter) -> Any:
    """The WHERE condition of a ``TaskFilter`` (agent ids apart: they are chunked)."""
    cond = pw.Value(1) == 1
    if flt.statuses is not None:
        cond &= t.status.in_([TaskStatus(s).value for s in flt.statuses])
    if flt.node is not None:
        cond &= t.node == flt.node
    if flt.since is not None:
        cond &= t.create_time >= flt.since
    if flt.until is not None:
        cond &= t.create_time <= flt.until
    return cond
