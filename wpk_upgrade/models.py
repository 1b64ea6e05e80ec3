"""Kernel data types: task statuses and their one transition table, tasks, agents, WPK refs.

Statuses are stored with the reference's database names (``Pending``, ``In progress``, ...)
and shown by ``upgrade_result`` with the mission's seven short words (decision D10); for
Cancelled, Timeout and Legacy the reference's long sentence goes to ``error_msg``.

Every status change anywhere in the project is checked against ``TRANSITIONS`` (through
``check_transition``); stores apply it, they never re-implement it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum


class TaskStatus(StrEnum):
    """A task's stored status (reference §8.2 database names)."""

    PENDING = "Pending"
    IN_PROGRESS = "In progress"
    DONE = "Done"
    FAILED = "Failed"
    CANCELLED = "Cancelled"
    TIMEOUT = "Timeout"
    LEGACY = "Legacy"

    @property
    def display(self) -> str:
        """The mission's short status word shown by ``upgrade_result`` (D10)."""
        return _DISPLAY[self]

    @property
    def sentence(self) -> str | None:
        """The reference's long status text, put in ``error_msg`` for D10 statuses."""
        return _SENTENCE.get(self)

    @property
    def final(self) -> bool:
        """True when no automatic step will change the task any more."""
        return self not in (TaskStatus.PENDING, TaskStatus.IN_PROGRESS)

    @property
    def active(self) -> bool:
        """True while the task blocks a new upgrade of the same agent (reference §4.6)."""
        return self in (TaskStatus.PENDING, TaskStatus.IN_PROGRESS)


_DISPLAY = {
    TaskStatus.PENDING: "In queue",
    TaskStatus.IN_PROGRESS: "Updating",
    TaskStatus.DONE: "Updated",
    TaskStatus.FAILED: "Error",
    TaskStatus.CANCELLED: "Cancelled",
    TaskStatus.TIMEOUT: "Timeout",
    TaskStatus.LEGACY: "Legacy",
}

_SENTENCE = {
    TaskStatus.CANCELLED: "Task cancelled since the manager was restarted",
    TaskStatus.TIMEOUT: (
        "Timeout reached while waiting for the response from the agent, check the result "
        "manually on the agent for more information"
    ),
    TaskStatus.LEGACY: (
        "Legacy upgrade: check the result manually since the agent cannot report the result "
        "of the task"
    ),
}

#: The reference's long status texts (what the reference itself shows as ``status``).
REFERENCE_STATUS_TEXT: dict[TaskStatus, str] = {
    TaskStatus.PENDING: "In queue",
    TaskStatus.IN_PROGRESS: "Updating",
    TaskStatus.DONE: "Updated",
    TaskStatus.FAILED: "Error",
    **_SENTENCE,
}


class NodeRule(StrEnum):
    """Which node may make a transition."""

    SAME_NODE = "same node"
    ANY_NODE = "any node"


#: (from, to) -> node rule. The reference's table (§8.3) plus D7 (late reports after Timeout)
#: and our cancel extension (a running task may be cancelled before its installer runs: the
#: store refuses In progress -> Cancelled once the installer phase is recorded).
TRANSITIONS: dict[tuple[TaskStatus, TaskStatus], NodeRule] = {
    (TaskStatus.PENDING, TaskStatus.IN_PROGRESS): NodeRule.SAME_NODE,
    (TaskStatus.IN_PROGRESS, TaskStatus.DONE): NodeRule.ANY_NODE,
    (TaskStatus.IN_PROGRESS, TaskStatus.FAILED): NodeRule.ANY_NODE,
    (TaskStatus.IN_PROGRESS, TaskStatus.LEGACY): NodeRule.SAME_NODE,
    (TaskStatus.PENDING, TaskStatus.CANCELLED): NodeRule.ANY_NODE,
    (TaskStatus.IN_PROGRESS, TaskStatus.CANCELLED): NodeRule.ANY_NODE,
    (TaskStatus.IN_PROGRESS, TaskStatus.TIMEOUT): NodeRule.ANY_NODE,
    (TaskStatus.PENDING, TaskStatus.TIMEOUT): NodeRule.ANY_NODE,
    (TaskStatus.TIMEOUT, TaskStatus.DONE): NodeRule.ANY_NODE,
    (TaskStatus.TIMEOUT, TaskStatus.FAILED): NodeRule.ANY_NODE,
}

#: Statuses a client may ask for through ``upgrade_update_status`` (reference §8.3); any other
#: is refused as a database error, like the reference's -1.
REQUESTABLE_STATUSES = frozenset(
    {TaskStatus.IN_PROGRESS, TaskStatus.DONE, TaskStatus.FAILED, TaskStatus.LEGACY}
)


def check_transition(
    current: TaskStatus, new: TaskStatus, task_node: str, requesting_node: str | None
) -> bool:
    """True when ``current -> new`` is allowed for a request coming from ``requesting_node``.

    ``requesting_node`` None means an internal actor (sweep, cancel) that is not bound to a node.
    """
    rule = TRANSITIONS.get((current, new))
    if rule is None:
        return False
    if rule is NodeRule.SAME_NODE and requesting_node is not None:
        return task_node == requesting_node
    return True


class Command(StrEnum):
    """Task commands (the ``command`` column)."""

    UPGRADE = "upgrade"
    UPGRADE_CUSTOM = "upgrade_custom"


@dataclass(frozen=True)
class Task:
    """One upgrade task of one agent, as the store returns it."""

    task_id: int
    agent_id: int
    node: str
    module: str
    command: str
    status: TaskStatus
    create_time: int
    update_time: int | None = None
    error_msg: str | None = None
    bytes_sent: int = 0
    bytes_total: int = 0


@dataclass(frozen=True)
class TaskParams:
    """What the dispatcher needs to run a task; stored beside the task so a restart can resume."""

    command: str
    version: str | None = None
    wpk_repo: str | None = None
    use_http: bool = False
    force_upgrade: bool = False
    package_type: str | None = None
    file_path: str | None = None
    installer: str | None = None
    legacy_target: bool = False

    def to_dict(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, False)}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> TaskParams:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)  # type: ignore[arg-type]


@dataclass(frozen=True)
class AgentInfo:
    """What the manager knows of an agent (the reference's global.db row)."""

    agent_id: int
    name: str = ""
    version: str | None = None
    os_platform: str | None = None
    os_major: str | None = None
    os_minor: str | None = None
    os_arch: str | None = None
    connection_status: str = "never_connected"
    node: str = ""
    last_seen: int | None = None

    @property
    def active(self) -> bool:
        return self.connection_status == "active"


@dataclass(frozen=True)
class WpkRef:
    """A WPK resolved for a task: where it is in the cache, its name and digests."""

    path: str
    file_name: str
    sha1: str
    sha256: str | None = None
    size: int = 0
    installer: str = "upgrade.sh"


@dataclass(frozen=True)
class StatusChange:
    """One recorded transition (history row)."""

    task_id: int
    from_status: TaskStatus | None
    to_status: TaskStatus
    time: int
    node: str
    reason: str | None = None
    extra: dict[str, object] = field(default_factory=dict)


def now() -> int:
    """Current time in epoch seconds."""
    return int(time.time())


def format_time(epoch: int | None) -> str:
    """D2: UTC ``YYYY/MM/DD hh:mm:ss``; ``"0"`` when never set."""
    if not epoch:
        return "0"
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y/%m/%d %H:%M:%S")
