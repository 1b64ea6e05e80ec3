"""The agent registry: which agents are connected to this node, and their events.

Implements ``interfaces.AgentHub`` for the manager-side transport: a connecting agent is
recorded in the store as ``active`` on this node (with what it announced: version, OS,
architecture), a disconnecting one as ``disconnected``. Events go to the upgrade service;
decision D6: an agent may only send ``upgrade_update_status`` about itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .errors import UpgradeCode
from .interfaces import AgentHub, AgentLink, TaskStore
from .models import AgentInfo, now
from .protocol import upgrade_error_reply

log = logging.getLogger(__name__)

EventHandler = Callable[[int, dict[str, Any]], Awaitable[dict[str, Any]]]


class AgentRegistry(AgentHub):
    """Connected agents of this node, keyed by agent id."""

    def __init__(self, store: TaskStore, node: str) -> None:
        self.store = store
        self.node = node
        self._links: dict[int, AgentLink] = {}
        self.on_event: EventHandler | None = None
        self.connected_event = asyncio.Event()

    def link(self, agent_id: int) -> AgentLink | None:
        """The live connection of an agent, or None."""
        return self._links.get(agent_id)

    @property
    def connected(self) -> list[int]:
        return sorted(self._links)

    async def agent_connected(self, info: AgentInfo, link: AgentLink) -> None:
        old = self._links.get(info.agent_id)
        self._links[info.agent_id] = link
        if old is not None and old is not link:
            log.warning(
                "agent %03d connected again; dropping its previous connection", info.agent_id
            )
            await old.close()
        record = dataclasses.replace(
            info, connection_status="active", node=self.node, last_seen=now()
        )
        await asyncio.to_thread(self.store.upsert_agent, record)
        log.info(
            "agent %03d connected (%s, %s %s %s)",
            info.agent_id,
            info.version,
            info.os_platform,
            info.os_major,
            info.os_arch,
        )
        self.connected_event.set()

    async def agent_disconnected(self, agent_id: int, link: AgentLink) -> None:
        if self._links.get(agent_id) is not link:
            return  # an older connection of an agent that already reconnected
        del self._links[agent_id]
        await asyncio.to_thread(
            self.store.set_connection, agent_id, "disconnected", self.node, now()
        )
        log.info("agent %03d disconnected", agent_id)

    async def agent_event(self, agent_id: int, message: dict[str, Any]) -> dict[str, Any]:
        command = message.get("command") if isinstance(message, dict) else None
        params = message.get("parameters") if isinstance(message, dict) else None
        if command != "upgrade_update_status" or not isinstance(params, dict):
            log.warning(
                "agent %03d sent a refused command %r (only upgrade_update_status "
                "about itself is accepted)",
                agent_id,
                command,
            )
            return upgrade_error_reply(UpgradeCode.TASK_CONFIGURATIONS)
        claimed = params.get("agents")
        if claimed is not None and claimed != [agent_id]:
            log.warning("agent %03d tried to report for agents %r; refused", agent_id, claimed)
            return upgrade_error_reply(UpgradeCode.TASK_CONFIGURATIONS, "Agent id not recognized")
        if self.on_event is None:
            return upgrade_error_reply(UpgradeCode.TASK_MANAGER_COMMUNICATION)
        return await self.on_event(
            agent_id, {**message, "parameters": {**params, "agents": [agent_id]}}
        )

    async def close_all(self) -> None:
        """Drop every connection (shutdown)."""
        for link in list(self._links.values()):
            await link.close()
        self._links.clear()
