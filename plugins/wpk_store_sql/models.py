"""peewee models of the task store tables, and their conversion to kernel types.

One set of model classes is built per opened database (``build_models``), so several stores
(a SQLite file and a PostgreSQL database, say) live side by side in one process. The tables
themselves are created by ``migrations.py``; these classes only query them. Rows never leave
the plugin: callers get ``Task``, ``StatusChange`` and ``AgentInfo``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import peewee as pw

from wpk_upgrade.models import AgentInfo, StatusChange, Task, TaskParams, TaskStatus


@dataclass(frozen=True)
class StoreModels:
    """The model classes bound to one database."""

    task: Any
    history: Any
    agent: Any
    agent_lock: Any
    metadata: Any


def build_models(db: pw.Database) -> StoreModels:
    """Model classes bound to ``db``."""

    class _Base(pw.Model):
        class Meta:
            database = db
            legacy_table_names = False

    class TaskRow(_Base):
        task_id = pw.BigAutoField()
        agent_id = pw.IntegerField()
        node = pw.CharField()
        module = pw.CharField()
        command = pw.CharField()
        status = pw.CharField()
        create_time = pw.BigIntegerField()
        update_time = pw.BigIntegerField(null=True)
        error_msg = pw.TextField(null=True)
        params = pw.TextField(null=True)
        bytes_sent = pw.BigIntegerField(default=0)
        bytes_total = pw.BigIntegerField(default=0)

        class Meta:
            table_name = "tasks"

    class HistoryRow(_Base):
        id = pw.BigAutoField()
        task_id = pw.BigIntegerField()
        from_status = pw.CharField(null=True)
        to_status = pw.CharField()
        change_time = pw.BigIntegerField()
        node = pw.CharField()
        reason = pw.TextField(null=True)
        extra = pw.TextField(null=True)

        class Meta:
            table_name = "task_history"

    class AgentRow(_Base):
        agent_id = pw.IntegerField(primary_key=True)
        name = pw.CharField(default="")
        version = pw.CharField(null=True)
        os_platform = pw.CharField(null=True)
        os_major = pw.CharField(null=True)
        os_minor = pw.CharField(null=True)
        os_arch = pw.CharField(null=True)
        connection_status = pw.CharField(default="never_connected")
        node = pw.CharField(default="")
        last_seen = pw.BigIntegerField(null=True)

        class Meta:
            table_name = "agents"

    class AgentLockRow(_Base):
        agent_id = pw.IntegerField(primary_key=True)

        class Meta:
            table_name = "agent_locks"

    class MetadataRow(_Base):
        name = pw.CharField(primary_key=True)
        value = pw.CharField()

        class Meta:
            table_name = "metadata"

    return StoreModels(TaskRow, HistoryRow, AgentRow, AgentLockRow, MetadataRow)


_STATUSES = {s.value: s for s in TaskStatus}


def task_from_values(v: Any) -> Task:
    """A ``Task`` from a plain row tuple in ``queries.TASK_FIELDS`` order (bulk reads)."""
    status = _STATUSES.get(v[5]) or TaskStatus(v[5])
    return Task(v[0], v[1], v[2], v[3], v[4], status, v[6], v[7], v[8], v[9] or 0, v[10] or 0)


def to_task(row: Any) -> Task:
    """A ``tasks`` row as a kernel ``Task``."""
    return Task(
        task_id=int(row.task_id),
        agent_id=int(row.agent_id),
        node=row.node,
        module=row.module,
        command=row.command,
        status=_STATUSES.get(row.status) or TaskStatus(row.status),
        create_time=int(row.create_time),
        update_time=None if row.update_time is None else int(row.update_time),
        error_msg=row.error_msg,
        bytes_sent=int(row.bytes_sent or 0),
        bytes_total=int(row.bytes_total or 0),
    )


def to_change(row: Any) -> StatusChange:
    """A ``task_history`` row as a kernel ``StatusChange``."""
    return StatusChange(
        task_id=int(row.task_id),
        from_status=None if row.from_status is None else TaskStatus(row.from_status),
        to_status=TaskStatus(row.to_status),
        time=int(row.change_time),
        node=row.node,
        reason=row.reason,
        extra=json.loads(row.extra) if row.extra else {},
    )


AGENT_COLUMNS = (
    "name",
    "version",
    "os_platform",
    "os_major",
    "os_minor",
    "os_arch",
    "connection_status",
    "node",
    "last_seen",
)


def agent_values(agent: AgentInfo) -> dict[str, Any]:
    """Column values of an ``agents`` row for ``agent``."""
    values = {name: getattr(agent, name) for name in AGENT_COLUMNS}
    values["agent_id"] = agent.agent_id
    return values


def to_agent(row: Any) -> AgentInfo:
    """An ``agents`` row as a kernel ``AgentInfo``."""
    return AgentInfo(
        agent_id=int(row.agent_id),
        name=row.name,
        version=row.version,
        os_platform=row.os_platform,
        os_major=row.os_major,
        os_minor=row.os_minor,
        os_arch=row.os_arch,
        connection_status=row.connection_status,
        node=row.node,
        last_seen=None if row.last_seen is None else int(row.last_seen),
    )


def params_json(params: TaskParams | None) -> str | None:
    """``TaskParams.to_dict()`` as the JSON text of the ``params`` column."""
    if params is None:
        return None
    return json.dumps(params.to_dict(), sort_keys=True, separators=(",", ":"))


def params_from_json(text: str | None) -> TaskParams | None:
    """The ``params`` column back as ``TaskParams`` (None when the task has none)."""
    if not text:
        return None
    return TaskParams.from_dict(json.loads(text))
