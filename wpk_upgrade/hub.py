"""The agent registry: which agents are connected to this node, and their events.

Implements ``interfaces.AgentHub`` for the manager-side transport: a connecting agent is
recorded in the store as ``active`` on this node (with what it announced: version, OS,
architecture), a disconnecting one as ``disconnected``. Heartbeats (``agent_seen``, called by
the transport) refresh ``last_seen`` at a bounded rate: at most once per heartbeat interval per
agent, written in batches. Events go to the upgrade service; decision D6: an agent may only
send ``upgrade_update_status`` about itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .errors import UpgradeCode
from .interfaces import AgentHub, AgentLink, TaskStore
from .models import AgentInfo, now
from .protocol import upgrade_error_reply
from .untrusted import clip

log = logging.getLogger(__name__)

EventHandler = Callable[[int, dict[str, Any]], Awaitable[dict[str, Any]]]

#: Heartbeats are gathered this long before their last_seen values are written together.
SEEN_BATCH_DELAY = 1.0


class AgentRegistry(AgentHub):
    """Connected agents of this node, keyed by agent id."""

    def __init__(self, store: TaskStore, node: str) -> None:
        self.store = store
        self.node = node
        self._links: dict[int, AgentLink] = {}
        self.on_event: EventHandler | None = None
        self.connected_event = asyncio.Event()
        self._changed = asyncio.Condition()
        self._writes: set[asyncio.Future[None]] = set()
        self._seen_at: dict[int, float] = {}
        self._seen_dirty: dict[int, int] = {}
        self._seen_flusher: asyncio.Task[None] | None = None
        self._seen_writing: asyncio.Future[None] | None = None

    async def _record(self, fn: Callable[..., None], *args: Any) -> None:
        """Run a store write in a worker thread, tracked until it ends (see ``drain``): a
        cancelled caller (transport shutdown) does not leave it running unnoticed."""
        future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._writes.add(future)
        future.add_done_callback(self._written)
        await asyncio.shield(future)

    def _written(self, future: asyncio.Future[None]) -> None:
        self._writes.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error("agent registry: store write failed: %s", future.exception())

    async def drain(self) -> None:
        """Wait for the store writes still running; call it after the transport closed and
        before the store closes (a write racing the close can crash the database driver).
        Heartbeat times not yet written are dropped."""
        if self._seen_flusher is not None and self._seen_writing is None:
            self._seen_flusher.cancel()
        while self._writes:
            await asyncio.wait(set(self._writes))

    def link(self, agent_id: int) -> AgentLink | None:
        """The live connection of an agent, or None."""
        return self._links.get(agent_id)

    async def wait_link(
        self, agent_id: int, timeout: float, not_link: AgentLink | None = None
    ) -> AgentLink | None:
        """The agent's live connection, waiting up to ``timeout`` seconds for it to (re)connect
        (after a manager restart, queued tasks resume before their agents are back).
        ``not_link``: a connection known to be dead; wait for another one."""

        def ready() -> bool:
            link = self._links.get(agent_id)
            return link is not None and link is not not_link

        if ready() or timeout <= 0:
            return self._links.get(agent_id) if ready() else None
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(ready)
        except TimeoutError:
            return None
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
        self._seen_at[info.agent_id] = time.monotonic()
        self._seen_dirty.pop(info.agent_id, None)
        await self._record(self.store.upsert_agent, record)
        log.info(
            "agent %03d connected (%s, %s %s %s)",
            info.agent_id,
            info.version,
            info.os_platform,
            info.os_major,
            info.os_arch,
        )
        self.connected_event.set()
        async with self._changed:
            self._changed.notify_all()

    async def agent_disconnected(self, agent_id: int, link: AgentLink) -> None:
        if self._links.get(agent_id) is not link:
            return  # an older connection of an agent that already reconnected
        del self._links[agent_id]
        self._seen_dirty.pop(agent_id, None)
        self._seen_at.pop(agent_id, None)
        if self._seen_writing is not None:  # its "active" must not land after our write
            await asyncio.shield(self._seen_writing)
        await self._record(self.store.set_connection, agent_id, "disconnected", self.node, now())
        log.info("agent %03d disconnected", agent_id)

    def agent_seen(self, agent_id: int, link: AgentLink, every: float) -> None:
        """A heartbeat from a connected agent (called by the transport): its ``last_seen`` is
        written at most once per ``every`` seconds, batched with the other agents'."""
        if self._links.get(agent_id) is not link:
            return
        t = time.monotonic()
        if t - self._seen_at.get(agent_id, 0.0) < every:
            return
        self._seen_at[agent_id] = t
        self._seen_dirty[agent_id] = now()
        if self._seen_flusher is None:
            self._seen_flusher = asyncio.ensure_future(self._flush_seen())

    async def _flush_seen(self) -> None:
        try:
            while self._seen_dirty:
                await asyncio.sleep(SEEN_BATCH_DELAY)
                batch, self._seen_dirty = self._seen_dirty, {}
                batch = {a: when for a, when in batch.items() if a in self._links}
                if batch:
                    self._seen_writing = asyncio.ensure_future(
                        self._record(self._write_seen, batch)
                    )
                    await asyncio.shield(self._seen_writing)
                    self._seen_writing = None
        finally:
            self._seen_writing = None
            self._seen_flusher = None

    def _write_seen(self, batch: dict[int, int]) -> None:
        for agent_id, when in batch.items():
            self.store.set_connection(agent_id, "active", self.node, when)

    async def agent_event(self, agent_id: int, message: dict[str, Any]) -> dict[str, Any]:
        command = message.get("command") if isinstance(message, dict) else None
        params = message.get("parameters") if isinstance(message, dict) else None
        if command != "upgrade_update_status" or not isinstance(params, dict):
            log.warning(
                "agent %03d sent a refused command %s (only upgrade_update_status "
                "about itself is accepted)",
                agent_id,
                clip(command),
            )
            return upgrade_error_reply(UpgradeCode.TASK_CONFIGURATIONS)
        claimed = params.get("agents")
        if claimed is not None and claimed != [agent_id]:
            log.warning(
                "agent %03d tried to report for agents %s; refused", agent_id, clip(claimed)
            )
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
