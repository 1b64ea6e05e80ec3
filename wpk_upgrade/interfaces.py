"""Driver interfaces (ABCs): WPK sources, task stores and agent transports.

A driver answers "which one implementation talks to this resource?". Each deployment picks
one per role in its configuration; ``drivers.py`` loads it by entry-point name with stevedore.

Rules every driver follows (DESIGN.md §5):

* class attributes ``name`` and ``config_schema`` (a marshmallow schema whose ``@post_load``
  returns a frozen dataclass, or None when the driver takes no options);
* no I/O in ``__init__``; resources are opened in ``open()``/``serve()``;
* only kernel types cross the boundary (never peewee rows, boto3 objects, sockets);
* third-party errors are wrapped at the boundary in the kernel's exceptions (``errors.py``).
"""

from __future__ import annotations

import asyncio
import base64
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import IO, Any, ClassVar, Literal

from marshmallow import Schema

from .models import AgentInfo, StatusChange, Task, TaskParams, TaskStatus

# --------------------------------------------------------------------------- WPK sources


@dataclass(frozen=True)
class WpkQuery:
    """What a source needs to find the WPK for one agent and one target version.

    ``base_url`` is the repository base, scheme included, ending in ``/`` (reference §5.1).
    ``package_type`` is already resolved (reference §5.3) or None when the agent has none.
    """

    base_url: str
    version: str
    os_platform: str
    os_major: str | None
    os_minor: str | None
    os_arch: str | None
    package_type: str | None
    agent_id: int = 0


@dataclass(frozen=True)
class WpkCandidate:
    """A WPK a source has located: where to fetch it, its file name and published digests."""

    url: str
    file_name: str
    sha1: str | None
    sha256: str | None = None
    size: int | None = None


ProgressFn = Callable[[int], None]


class WpkSource(ABC):
    """Where WPK files come from (entry-point group ``wpk_upgrade.sources``).

    Entry-point names are URL schemes (``https``, ``http``, ``file``, ``s3``) plus ``custom``
    for the local files of ``upgrade_custom``. All methods are blocking; the kernel calls them
    from worker threads.
    """

    name: ClassVar[str]
    config_schema: ClassVar[type[Schema] | None] = None

    def __init__(self, config: Any = None) -> None:
        self.config = config

    @abstractmethod
    def resolve(self, query: WpkQuery) -> WpkCandidate:
        """Locate the WPK for ``query``.

        Raises ``UpgradeError`` with 14 (repository not reachable), 15 (version not in the
        repository) or 9 (no WPK for this platform), with a precise ``detail``.
        """

    def latest_version(self, query: WpkQuery) -> str | None:
        """The newest version the repository offers for the agent's platform (decision D1).

        ``query.version`` is ignored. Returns None when the source cannot tell.
        """
        return None

    @abstractmethod
    def fetch(
        self, candidate: WpkCandidate, out: IO[bytes], offset: int, progress: ProgressFn
    ) -> None:
        """Write the WPK's bytes from ``offset`` on into ``out`` (already positioned there).

        Call ``progress(n)`` as bytes arrive. Raise ``UpgradeError`` 16 (WPK file does not
        exist) when it cannot be fetched after the source's own retries; any partial bytes
        already written stay so that a later call can resume from the larger offset.
        """


# --------------------------------------------------------------------------- task stores


class UpdateOutcome(str):
    """Result of a status update: ``ok``, ``not_found`` (no task or transition refused)."""


UPDATE_OK = UpdateOutcome("ok")
UPDATE_NOT_FOUND = UpdateOutcome("not_found")

#: What an active task is doing (``TaskStore.task_phase``): waiting In queue, being pushed
#: (Updating), or past the point where the agent's installer may run (Updating).
PHASE_QUEUED = "queued"
PHASE_TRANSFERRING = "transferring"
PHASE_INSTALLING = "installing"


@dataclass(frozen=True)
class TaskFilter:
    """Filters for listing tasks; None means "any"."""

    statuses: tuple[TaskStatus, ...] | None = None
    agent_ids: tuple[int, ...] | None = None
    node: str | None = None
    since: int | None = None
    until: int | None = None
    limit: int = 1000


class TaskStore(ABC):
    """The fleet's memory: tasks, their history, and the agent registry.

    Entry-point group ``wpk_upgrade.stores``; chosen by database URL scheme. Every status
    change goes through ``models.check_transition`` and writes one history row in the same
    transaction. Methods are blocking and thread-safe (the kernel calls them from a pool).
    """

    name: ClassVar[str]
    config_schema: ClassVar[type[Schema] | None] = None

    def __init__(self, url: str, config: Any = None) -> None:
        self.url = url
        self.config = config

    @abstractmethod
    def open(self) -> None:
        """Connect, create or migrate the schema. Raises ``PluginError`` for a missing driver."""

    @abstractmethod
    def close(self) -> None:
        """Release connections."""

    # ---- tasks
    @abstractmethod
    def create_tasks(
        self,
        agent_ids: Sequence[int],
        node: str,
        module: str,
        command: str,
        params: TaskParams | None = None,
        now: int | None = None,
    ) -> list[Task]:
        """Insert one Pending task per agent, all or nothing, ids in request order.

        Raises ``TaskError(DATABASE_ERROR)`` when the insert fails.
        """

    @abstractmethod
    def create_tasks_if_idle(
        self,
        agent_ids: Sequence[int],
        node: str,
        module: str,
        command: str,
        params: TaskParams | None = None,
        now: int | None = None,
    ) -> tuple[list[Task], list[int]]:
        """Atomically create Pending tasks only for agents with no active task.

        First applies the other-node-Pending deletion rule of ``get_status``; then agents whose
        latest task is Pending or In progress are returned as busy. Returns (created tasks in
        request order, busy agent ids). Two callers racing for one agent get exactly one task.
        """

    @abstractmethod
    def claim_pending(
        self,
        node: str,
        limit: int,
        now: int | None = None,
        skip_agents: Collection[int] = (),
    ) -> list[Task]:
        """Atomically move up to ``limit`` Pending tasks of ``node`` to In progress (oldest
        first) and return them; a task is never claimed twice, across processes and nodes.

        Only tasks stored with parameters are claimed (an upgrade service created them to be
        run); a task created without (the task socket's record-only ``upgrade``) stays
        Pending. Tasks of the agents in ``skip_agents`` (a push to them is still running
        here) are left Pending, so their timeout does not start (D7).
        """

    @abstractmethod
    def get_status(self, agent_id: int, node: str) -> TaskStatus | None:
        """Status of the agent's latest upgrade task, as the reference's ``upgrade_get_status``.

        A Pending latest task owned by another node is deleted and None is returned
        (reference §8.3).
        """

    @abstractmethod
    def update_status(
        self,
        agent_id: int,
        node: str | None,
        status: TaskStatus,
        error_msg: str | None = None,
        reason: str | None = None,
        now: int | None = None,
    ) -> UpdateOutcome:
        """Move the agent's latest task to ``status`` if ``check_transition`` allows it.

        ``node`` None is an internal actor. Writes ``update_time`` and ``error_msg`` (NULL when
        not given). Returns ``UPDATE_NOT_FOUND`` when there is no task or the move is refused.
        In progress -> Cancelled is also refused once ``PHASE_INSTALLING`` is recorded
        (``record_phase``), atomically with that record: exactly one of the two wins.
        """

    def update_status_many(
        self,
        agent_ids: Sequence[int],
        node: str | None,
        status: TaskStatus,
        error_msg: str | None = None,
        reason: str | None = None,
        now: int | None = None,
    ) -> dict[int, Task]:
        """``update_status`` for many agents (one request naming thousands): the tasks that
        moved, by agent, as they were before the move. This default calls ``update_status``
        per agent; a store may do it in a few statements (the SQL store does)."""
        before = self.latest_tasks(list(agent_ids))
        moved: dict[int, Task] = {}
        for agent in dict.fromkeys(agent_ids):
            if agent in before and (
                self.update_status(agent, node, status, error_msg, reason, now) == UPDATE_OK
            ):
                moved[agent] = before[agent]
        return moved

    @abstractmethod
    def set_task_status(
        self,
        task_id: int,
        node: str | None,
        status: TaskStatus,
        error_msg: str | None = None,
        reason: str | None = None,
        now: int | None = None,
    ) -> bool:
        """Like ``update_status`` but for one task id; True when it moved."""

    @abstractmethod
    def get_task(self, task_id: int) -> Task | None:
        """One task by id."""

    @abstractmethod
    def latest_tasks(self, agent_ids: Sequence[int]) -> dict[int, Task]:
        """Latest upgrade task per agent (by create time, then task id); absent agents omitted."""

    @abstractmethod
    def task_params(self, task_id: int) -> TaskParams | None:
        """The parameters stored with a task (for dispatch and restart recovery)."""

    @abstractmethod
    def pending_tasks(self, node: str, limit: int = 1000) -> list[Task]:
        """Pending tasks of ``node``, oldest first."""

    @abstractmethod
    def tasks_in_status(self, node: str | None, status: TaskStatus) -> list[Task]:
        """Tasks (of ``node``, or any node when None) currently in ``status``."""

    @abstractmethod
    def cancel_pending(self, node: str, now: int | None = None) -> int:
        """Pending tasks of ``node`` become Cancelled; returns how many."""

    @abstractmethod
    def expire(self, now: int, task_timeout: int) -> tuple[int, int]:
        """In-progress tasks whose ``update_time + task_timeout <= now`` become Timeout.

        Returns (how many timed out, next deadline epoch: the earliest remaining
        ``update_time + task_timeout``, else ``now + task_timeout``).
        """

    @abstractmethod
    def delete_old(self, before: int) -> int:
        """Delete final tasks created at or before ``before``; returns how many.

        Their history stays (see ``delete_history_before``)."""

    @abstractmethod
    def delete_history_before(self, before: int) -> int:
        """Delete the history rows recorded at or before ``before`` whose task no longer
        exists (``history_retention``); returns how many."""

    @abstractmethod
    def record_phase(self, task_id: int, phase: str, now: int | None = None) -> bool:
        """Record that an In progress task entered ``phase`` (``PHASE_INSTALLING``: the
        installer may start from now on, so a restart must not push it again). Atomic with
        the status check; False (nothing recorded) when the task is not In progress."""

    @abstractmethod
    def task_phase(self, task_id: int) -> str | None:
        """``PHASE_QUEUED`` for a Pending task; for an In progress one the last recorded
        phase, else ``PHASE_TRANSFERRING``; None for a final or unknown task."""

    @abstractmethod
    def interrupted_transfers(self, node: str) -> list[Task]:
        """In progress tasks of ``node`` stored with parameters whose installer phase was
        never recorded: pushes cut short by a stop or a crash (restart recovery), by id."""

    @abstractmethod
    def set_progress(self, task_id: int, sent: int, total: int) -> None:
        """Record transfer progress (bytes sent / total)."""

    @abstractmethod
    def history(self, task_id: int) -> list[StatusChange]:
        """Every recorded transition of a task, oldest first."""

    @abstractmethod
    def list_tasks(self, flt: TaskFilter) -> list[Task]:
        """Tasks matching the filter, newest first."""

    # ---- agents
    @abstractmethod
    def upsert_agent(self, agent: AgentInfo) -> None:
        """Insert or replace what is known of an agent."""

    @abstractmethod
    def get_agent(self, agent_id: int) -> AgentInfo | None:
        """One agent, or None when unknown."""

    @abstractmethod
    def get_agents(self, agent_ids: Sequence[int]) -> dict[int, AgentInfo]:
        """Several agents in a few queries (intake); unknown agents are omitted."""

    @abstractmethod
    def list_agents(self) -> list[AgentInfo]:
        """All known agents, by id."""

    @abstractmethod
    def set_connection(self, agent_id: int, status: str, node: str, when: int) -> None:
        """Record an agent's connection status (``active`` / ``disconnected``) and last seen."""

    @abstractmethod
    def disconnect_node_agents(self, node: str) -> int:
        """Mark every agent connected to ``node`` as disconnected (node start-up)."""


# --------------------------------------------------------------------------- transports

#: The empty buffer a ``request_data`` payload carries in place of its data.
EMPTY_BUFFER = '"buffer":""'


class AgentLink(ABC):
    """The manager's handle on one connected agent."""

    agent_id: int

    @abstractmethod
    async def request(self, target: str, payload: str, timeout: float) -> str:
        """Send one command (reference target ``upgrade`` or ``com`` and its payload text)
        and return the agent's reply text. Raises ``TimeoutError`` or ``ConnectionError``."""

    async def request_data(self, target: str, payload: str, data: bytes, timeout: float) -> str:
        """``request`` of a JSON command whose ``"buffer":""`` (empty, once in ``payload``)
        stands for ``data``, a chunk of a WPK. A link that carries bytes sends them as they
        are (the tcp transport does); this default writes their base64 text into the buffer,
        the reference wire format, and calls ``request``."""
        at = payload.index(EMPTY_BUFFER) + len(EMPTY_BUFFER) - 1
        text = payload[:at] + base64.b64encode(data).decode("ascii") + payload[at:]
        return await self.request(target, text, timeout)

    @abstractmethod
    async def close(self) -> None:
        """Drop the connection."""


class AgentHub(ABC):
    """What the kernel offers a manager-side transport (implemented by ``hub.AgentRegistry``)."""

    @abstractmethod
    async def agent_connected(self, info: AgentInfo, link: AgentLink) -> None:
        """An agent announced itself."""

    @abstractmethod
    async def agent_disconnected(self, agent_id: int, link: AgentLink) -> None:
        """An agent's connection ended."""

    @abstractmethod
    async def agent_event(self, agent_id: int, message: dict[str, Any]) -> dict[str, Any]:
        """An agent sent an event (only ``upgrade_update_status`` about itself is accepted,
        D6); returns the reply to send back."""


RequestHandler = Callable[[str, str], Awaitable[str]]
"""Agent side: ``(target, payload) -> reply text`` for one manager command."""


class ManagerChannel(ABC):
    """The agent's handle on its manager connection."""

    @abstractmethod
    async def send_event(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send an event to the manager and wait for its reply."""


class Transport(ABC):
    """How the manager and its agents talk (entry-point group ``wpk_upgrade.transports``)."""

    name: ClassVar[str]
    config_schema: ClassVar[type[Schema] | None] = None

    def __init__(self, config: Any = None) -> None:
        self.config = config

    def check(self, role: Literal["manager", "agent"]) -> None:
        """Verify, without connecting or listening, what the options name for ``role``'s side
        (certificate and key files, addresses): ``ConfigError`` on a fault. Called by
        ``wpk-upgrade config check`` and by the agent process before it starts. The default
        checks nothing."""
        return None

    @abstractmethod
    async def serve(self, hub: AgentHub) -> None:
        """Manager side: start accepting agents; return once listening."""

    @abstractmethod
    async def close(self) -> None:
        """Manager side: stop accepting and drop every connection."""

    @abstractmethod
    async def run_agent(
        self,
        identity: Callable[[], AgentInfo],
        on_request: RequestHandler,
        on_connected: Callable[[ManagerChannel], Awaitable[None]],
        stop: asyncio.Event,
    ) -> None:
        """Agent side: connect (and reconnect) to the manager until ``stop`` is set.

        ``identity()`` is called at each connection to announce the agent; ``on_request`` answers
        manager commands (each in its own task). ``on_connected`` is started as a task once per
        established connection and may run for the connection's whole life: the transport
        cancels it when the connection ends (that is how the agent learns of a disconnect).
        """
