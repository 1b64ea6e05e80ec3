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
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import peewee as pw

from wpk_upgrade.interfaces import TaskFilter
from wpk_upgrade.models import Task, TaskStatus, check_transition

from .models import StoreModels, to_task

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


def latest_rows(m: StoreModels, agent_ids: Iterable[int]) -> dict[int, Any]:
    """Latest task row per agent (highest create_time, then task id), ``CHUNK`` agents a query.

    SQLite and PostgreSQL: one (agent_id, create_time, task_id) index probe per agent, from a
    ``VALUES`` list of the ids. MySQL/MariaDB (whose ``VALUES`` syntax differs): newest
    create_time per agent by ``GROUP BY`` (a loose index scan there), the highest task id
    among rows sharing it.
    """
    db = m.task._meta.database
    wanted = sorted({int(a) for a in agent_ids})
    found: dict[int, Any] = {}
    for chunk in chunks(wanted):
        if isinstance(db, pw.MySQLDatabase):
            found.update(_latest_grouped(m, chunk))
        else:
            found.update(_latest_probed(m, chunk, db.param))
    return found


def _latest_probed(m: StoreModels, chunk: Sequence[int], param: str) -> dict[int, Any]:
    values = ", ".join(f"({param})" for _ in chunk)
    sql = (
        f"WITH ids (agent_id) AS (VALUES {values}) "
        "SELECT * FROM tasks WHERE task_id IN ("
        " SELECT (SELECT t.task_id FROM tasks t WHERE t.agent_id = ids.agent_id"
        "  ORDER BY t.create_time DESC, t.task_id DESC LIMIT 1) FROM ids)"
    )
    return {row.agent_id: row for row in m.task.raw(sql, *chunk)}


def _latest_grouped(m: StoreModels, chunk: Sequence[int]) -> dict[int, Any]:
    t = m.task
    newest = (
        t.select(t.agent_id, pw.fn.MAX(t.create_time).alias("newest"))
        .where(t.agent_id.in_(list(chunk)))
        .group_by(t.agent_id)
        .alias("newest")
    )
    query = t.select().join(
        newest, on=((t.agent_id == newest.c.agent_id) & (t.create_time == newest.c.newest))
    )
    found: dict[int, Any] = {}
    for row in query:
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


def is_phase_row(h: Any) -> Any:
    """Condition: a history row that records a phase, not a transition (from == to)."""
    return h.from_status.is_null(False) & (h.from_status == h.to_status)


def phase_of(extra: str | None) -> str | None:
    """The phase named by a phase row's ``extra`` text."""
    if not extra:
        return None
    value = json.loads(extra).get("phase")
    return value if isinstance(value, str) else None


def add_history(m: StoreModels, entries: Sequence[dict[str, Any]]) -> None:
    """Insert history rows."""
    for chunk in chunks(entries, 100):
        m.history.insert_many(list(chunk)).as_rowcount().execute()


def move(
    m: StoreModels,
    row: Any,
    new: TaskStatus,
    actor: str | None,
    error_msg: str | None,
    reason: str | None,
    when: int,
) -> Outcome:
    """Move one task row to ``new`` if ``check_transition`` allows it (conditional UPDATE)."""
    current = TaskStatus(row.status)
    if not check_transition(current, new, row.node, actor):
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


def ensure_lock_rows(m: StoreModels, agent_ids: Sequence[int]) -> None:
    """Create missing ``agent_locks`` rows, outside any transaction (autocommit).

    Done before the transaction so that the transaction only ever takes row locks with
    ``SELECT ... FOR UPDATE`` in id order: no insert-lock interleaving, no deadlock.
    """
    lock = m.agent_lock
    for chunk in chunks(agent_ids):
        have = {r.agent_id for r in lock.select(lock.agent_id).where(lock.agent_id.in_(chunk))}
        missing = [{"agent_id": a} for a in chunk if a not in have]
        if missing:
            lock.insert_many(missing).on_conflict_ignore().as_rowcount().execute()


def lock_agents(m: StoreModels, agent_ids: Sequence[int]) -> None:
    """Lock the agents' ``agent_locks`` rows (ids sorted) until the transaction ends."""
    lock = m.agent_lock
    for chunk in chunks(agent_ids):
        list(
            lock.select(lock.agent_id)
            .where(lock.agent_id.in_(chunk))
            .order_by(lock.agent_id)
            .for_update()
        )


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


def insert_task(
    m: StoreModels,
    agent_id: int,
    node: str,
    module: str,
    command: str,
    pjson: str | None,
    when: int,
) -> Task:
    """Insert one Pending task row; returns it as a ``Task``."""
    task_id = m.task.insert(
        agent_id=agent_id,
        node=node,
        module=module,
        command=command,
        status=TaskStatus.PENDING.value,
        create_time=when,
        update_time=None,
        error_msg=None,
        params=pjson,
        bytes_sent=0,
        bytes_total=0,
    ).execute()
    return Task(int(task_id), int(agent_id), node, module, command, TaskStatus.PENDING, when)


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
