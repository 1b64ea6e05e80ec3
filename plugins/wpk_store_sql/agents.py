"""The agent registry half of ``SqlTaskStore`` (table ``agents``), as a mixin.

What the manager knows of each agent (the reference's global.db row): name, version, OS,
connection status, the node it is connected to and when it was last seen.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from wpk_upgrade.models import AgentInfo

from .models import AGENT_COLUMNS, StoreModels, agent_values, to_agent
from .urls import MYSQL, DbTarget

R = TypeVar("R")

_CHUNK = 500  # ids per IN (...) list
#: An ``agents`` row read without the ORM (``get_agents``), attribute names as the model's.
_AgentTuple = namedtuple("_AgentTuple", ["agent_id", *AGENT_COLUMNS])  # type: ignore[misc]
_AGENT_SELECT = ", ".join(_AgentTuple._fields)


class AgentRegistryMixin:
    """Agent methods of ``TaskStore``; the host class provides ``target`` and ``_run``."""

    target: DbTarget

    if TYPE_CHECKING:

        def _run(
            self,
            what: str,
            fn: Callable[[StoreModels], R],
            *,
            write: bool = True,
            prepare: Callable[[StoreModels], None] | None = None,
        ) -> R: ...

    def upsert_agent(self, agent: AgentInfo) -> None:
        def op(m: StoreModels) -> None:
            a = m.agent
            columns = [getattr(a, c) for c in AGENT_COLUMNS]
            self._upsert(a.insert(**agent_values(agent)), a.agent_id, columns).execute()

        self._run("upsert agent", op)

    def get_agent(self, agent_id: int) -> AgentInfo | None:
        def op(m: StoreModels) -> AgentInfo | None:
            row = m.agent.get_or_none(m.agent.agent_id == agent_id)
            return None if row is None else to_agent(row)

        return self._run("get agent", op, write=False)

    def get_agents(self, agent_ids: Sequence[int]) -> dict[int, AgentInfo]:
        """Known agents among ``agent_ids``, one ``IN (...)`` query per 500 ids."""
        wanted = sorted({int(a) for a in agent_ids})
        if not wanted:
            return {}

        def op(m: StoreModels) -> dict[int, AgentInfo]:
            db = m.agent._meta.database
            found: dict[int, AgentInfo] = {}
            for start in range(0, len(wanted), _CHUNK):
                chunk = wanted[start : start + _CHUNK]
                marks = ", ".join([db.param] * len(chunk))
                sql = f"SELECT {_AGENT_SELECT} FROM agents WHERE agent_id IN ({marks})"
                rows = (_AgentTuple(*r) for r in db.execute_sql(sql, chunk).fetchall())
                found.update((int(r.agent_id), to_agent(r)) for r in rows)
            return found

        return self._run("get agents", op, write=False)

    def list_agents(self) -> list[AgentInfo]:
        def op(m: StoreModels) -> list[AgentInfo]:
            return [to_agent(r) for r in m.agent.select().order_by(m.agent.agent_id)]

        return self._run("list agents", op, write=False)

    def set_connection(self, agent_id: int, status: str, node: str, when: int) -> None:
        """Record connection status, node and last seen; an unknown agent gets a minimal row."""

        def op(m: StoreModels) -> None:
            a = m.agent
            insert = a.insert(
                agent_id=agent_id, name="", connection_status=status, node=node, last_seen=when
            )
            self._upsert(insert, a.agent_id, [a.connection_status, a.node, a.last_seen]).execute()

        self._run("set agent connection", op)

    def disconnect_node_agents(self, node: str) -> int:
        """Agents ``active`` on ``node`` become ``disconnected``; returns how many."""

        def op(m: StoreModels) -> int:
            a = m.agent
            return int(
                a.update(connection_status="disconnected")
                .where((a.node == node) & (a.connection_status == "active"))
                .execute()
            )

        return self._run("disconnect node agents", op)

    def _upsert(self, insert: Any, key: Any, columns: list[Any]) -> Any:
        """INSERT ... ON CONFLICT (key) DO UPDATE, or MySQL's ON DUPLICATE KEY UPDATE."""
        if self.target.dialect == MYSQL:
            return insert.on_conflict(preserve=columns)
        return insert.on_conflict(conflict_target=[key], preserve=columns)
