"""Simulated agents over the real tcp transport, for measurements that need many upgrades
against manager processes (R2, R7): each behaves like a real agent on the wire (the JSON
command set, a report after its "installer", repeated until the manager clears it with
``clear_upgrade_result``) and counts what it was asked to install.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import random
import threading
from collections import Counter
from typing import Any

from wpk_transport_tcp.transport import TcpOptions, TcpTransport

from wpk_upgrade.interfaces import ManagerChannel
from wpk_upgrade.models import AgentInfo

PLATFORM = {"os_platform": "ubuntu", "os_major": "22", "os_minor": "04", "os_arch": "x86_64"}
REPORT = {
    "command": "upgrade_update_status",
    "parameters": {"error": 0, "message": "Upgrade was successful", "status": "Done"},
}


def _reply(message: str, code: int = 0) -> str:
    return json.dumps({"error": code, "message": message, "data": []}, separators=(",", ":"))


class SimAgent:
    """One simulated agent: ``installs`` counts ``upgrade`` commands per file name."""

    def __init__(self, agent_id: int, address: str, report_delay: float = 1.0) -> None:
        self.info = AgentInfo(
            agent_id=agent_id, name=f"sim{agent_id}", version="v4.8.0", **PLATFORM
        )
        self.transport = TcpTransport(
            TcpOptions(address=address, heartbeat=2.0, reconnect_min=0.05, reconnect_max=0.5)
        )
        self.installs: Counter[str] = Counter()
        self.reports_sent = 0
        self.pending = False
        self.report_delay = report_delay  # the "restart" before the first report
        self.pending_since = 0.0
        self.connections = 0
        self._digest = hashlib.sha1()
        self._channel: ManagerChannel | None = None

    async def handle(self, target: str, payload: str) -> str:
        if target == "com":
            return "ok " if payload.startswith("lock_restart") else "err Unrecognized command"
        msg = json.loads(payload)
        command, params = msg.get("command"), msg.get("parameters", {})
        if command == "open":
            self._digest = hashlib.sha1()
            return _reply("ok")
        if command == "write":
            self._digest.update(base64.b64decode(params["buffer"]))
            return _reply("ok")
        if command == "close":
            return _reply("ok")
        if command == "sha1":
            return _reply(self._digest.hexdigest())
        if command == "upgrade":
            self.installs[str(params.get("file"))] += 1
            self.pending = True  # the "installer" ran: report after the "restart"
            self.pending_since = asyncio.get_running_loop().time()
            self.report_delay = random.uniform(0.5, 2.0)
            return _reply("0")
        if command == "clear_upgrade_result":
            self.pending = False
            return _reply("ok")
        return _reply("Command not found", 2)

    async def connected(self, channel: ManagerChannel) -> None:
        self.connections += 1
        self._channel = channel
        try:
            while True:
                due = self.pending_since + self.report_delay
                if self.pending and asyncio.get_running_loop().time() >= due:
                    with contextlib.suppress(Exception):
                        await channel.send_event(REPORT, 10)
                        self.reports_sent += 1
                await asyncio.sleep(0.25)
        finally:
            self._channel = None


class Fleet:
    """Simulated agents on one event-loop thread; ``addresses`` picks each agent's manager."""

    def __init__(self, agents: dict[int, str]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.agents = {a: SimAgent(a, address) for a, address in agents.items()}
        self._stop: asyncio.Event | None = None
        self._runs: list[Any] = []

    def __enter__(self) -> Fleet:
        self.thread.start()

        async def start() -> None:
            self._stop = asyncio.Event()
            for agent in self.agents.values():
                self._runs.append(
                    asyncio.ensure_future(
                        agent.transport.run_agent(
                            lambda a=agent: a.info, agent.handle, agent.connected, self._stop
                        )
                    )
                )

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._stop is not None
            self._stop.set()
            await asyncio.wait(self._runs, timeout=10)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def installs(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for agent in self.agents.values():
            for name, count in agent.installs.items():
                total[f"{agent.info.agent_id}:{name}"] += count
        return total
