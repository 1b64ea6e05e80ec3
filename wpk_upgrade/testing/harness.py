"""Test and embedding harness: a real manager node running in a background thread.

``ManagerHarness`` starts a ``daemon.Manager`` (real store, real UNIX sockets, real transport)
on its own event loop thread, and offers blocking helpers to talk to its sockets the way an
external client does. ``ScriptedAgent`` is an agent simulator over the real transport (like
the reference QA suite's): it answers manager commands with a script, so tests can reproduce
agents that stall or fail at a given step.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from ..config import ManagerConfig, ManagerConfigSchema, load_data
from ..daemon import Manager
from ..framing import request_unix
from ..interfaces import ManagerChannel, TaskStore
from ..models import AgentInfo

T = TypeVar("T")


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Poll ``predicate`` every 50 ms; ``AssertionError`` naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not reached: {what}")


def manager_config(home: Path, **overrides: Any) -> ManagerConfig:
    """A manager configuration for tests: transport on an ephemeral loopback port."""
    data: dict[str, Any] = {
        "home": str(home),
        "node_name": "node01",
        "transport": {"name": "tcp", "options": {"listen": "127.0.0.1:0", "heartbeat": 2.0}},
        "task_manager": {"sweep_interval": 1},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    cfg: ManagerConfig = load_data(data, ManagerConfigSchema())
    return cfg


class ManagerHarness:
    """A manager node on a background event-loop thread."""

    def __init__(self, config: ManagerConfig, **manager_kwargs: Any) -> None:
        self.config = config
        self._kwargs = manager_kwargs
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.manager: Manager | None = None

    def __enter__(self) -> ManagerHarness:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run a coroutine on the manager's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self._thread.start()

        async def make() -> Manager:
            manager = Manager(self.config, **self._kwargs)
            await manager.start()
            return manager

        self.manager = self.run(make())

    def stop(self) -> None:
        if self.manager is not None:
            manager = self.manager

            async def stop() -> None:
                # Agents' disconnections are written to the store from worker threads; let
                # them finish before Manager.stop closes the store (a write racing the close
                # crashed the SQLite driver: segmentation fault).
                manager.stop_event.set()
                await manager.transport.close()
                await manager.hub.drain()
                await manager.stop()

            self.run(stop())
            self.manager = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    @property
    def store(self) -> TaskStore:
        assert self.manager is not None
        return self.manager.store

    @property
    def transport_address(self) -> str:
        assert self.manager is not None
        port = self.manager.transport.bound_port  # type: ignore[attr-defined]
        return f"127.0.0.1:{port}"

    def send_raw(self, socket: str, payload: bytes) -> dict[str, Any]:
        """Send raw bytes to ``upgrade`` or ``task`` socket and decode the JSON reply."""
        path = self.config.upgrade_socket if socket == "upgrade" else self.config.task_socket
        reply: dict[str, Any] = json.loads(request_unix(str(path), payload))
        return reply

    def upgrade(self, message: dict[str, Any]) -> dict[str, Any]:
        return self.send_raw("upgrade", json.dumps(message).encode())

    def task(self, message: dict[str, Any]) -> dict[str, Any]:
        return self.send_raw("task", json.dumps(message).encode())

    def result(self, agents: list[int]) -> list[dict[str, Any]]:
        """``upgrade_result`` items for ``agents`` (through the task socket)."""
        reply = self.task(
            {
                "origin": {"module": "api"},
                "command": "upgrade_result",
                "parameters": {"agents": agents},
            }
        )
        items: list[dict[str, Any]] = reply["data"]
        return items

    def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 30, interval: float = 0.05
    ) -> None:
        """Poll ``predicate`` until it is true; ``AssertionError`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(interval)
        raise AssertionError("condition not reached in time")

    def wait_final(self, agents: list[int], timeout: float = 30) -> list[dict[str, Any]]:
        """Wait until every agent's latest task is final; return the result items."""
        final = {"Updated", "Error", "Cancelled", "Timeout", "Legacy"}
        items: list[dict[str, Any]] = []

        def done() -> bool:
            nonlocal items
            items = self.result(agents)
            return all(i.get("status") in final for i in items)

        self.wait_for(done, timeout)
        return items

    def seed_agent(self, agent: AgentInfo) -> None:
        """Record an agent in the store (as the reference's global.db would hold it)."""
        self.store.upsert_agent(agent)


Script = Callable[[str, str], str | None]


class ScriptedAgent:
    """An agent simulator on the real transport, answering commands with ``script``.

    ``script(target, payload)`` returns the reply text, or None to stay silent (the manager
    then times out). Every received command is recorded in ``received``.
    """

    def __init__(self, harness: ManagerHarness, info: AgentInfo, script: Script) -> None:
        from ..drivers import TRANSPORTS, driver_class, load_options

        self.harness = harness
        self.info = info
        self.script = script
        self.received: list[tuple[str, str]] = []
        self.channel: ManagerChannel | None = None
        cls = driver_class(TRANSPORTS, harness.config.transport.name or "tcp")
        options = dict(harness.config.transport.options)
        options.pop("listen", None)
        options["address"] = harness.transport_address
        options["reconnect_min"] = 0.05
        self.transport = cls(load_options(cls, options, "transport"))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._stop = asyncio.Event()
        self._future: Any = None

    def __enter__(self) -> ScriptedAgent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _handle(self, target: str, payload: str) -> str:
        self.received.append((target, payload))
        reply = self.script(target, payload)
        if reply is None:
            await asyncio.Event().wait()  # never answers
        return reply or ""

    async def _connected(self, channel: ManagerChannel) -> None:
        self.channel = channel

    def start(self, wait: bool = True) -> None:
        self._thread.start()
        self._future = asyncio.run_coroutine_threadsafe(
            self.transport.run_agent(lambda: self.info, self._handle, self._connected, self._stop),
            self.loop,
        )
        if wait:
            # Both ends: the manager has the link, and the agent has been told it is connected
            # (its channel is what ``report`` and events go through; the welcome it waits for
            # may arrive after the manager registered the link).
            self.harness.wait_for(
                lambda: (
                    self.harness.manager is not None
                    and self.harness.manager.hub.link(self.info.agent_id) is not None
                    and self.channel is not None
                ),
                10,
            )

    def report(self, parameters: dict[str, Any]) -> dict[str, Any]:
        """Send an ``upgrade_update_status`` event, as an agent does after its restart."""
        assert self.channel is not None
        message = {"command": "upgrade_update_status", "parameters": parameters}
        return asyncio.run_coroutine_threadsafe(
            self.channel.send_event(message, 10), self.loop
        ).result(15)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        if self._future is not None:
            try:
                self._future.result(10)
            except Exception:  # noqa: BLE001 - stopping a simulator never fails a test
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def json_agent(
    sha1: Callable[[], str] | None = None,
    stall_at: str | None = None,
    fail_at: str | None = None,
    installer_status: str = "0",
) -> Script:
    """A script for a well-behaved JSON-protocol agent, optionally stalling or failing at a
    given command (``lock_restart``, ``open``, ``write``, ``close``, ``sha1``, ``upgrade``)."""
    import base64
    import hashlib

    digest = hashlib.sha1()

    def script(target: str, payload: str) -> str | None:
        if target == "com":
            command = payload.split(" ", 1)[0]
        else:
            msg = json.loads(payload)
            command = msg["command"]
        if command == stall_at:
            return None
        if command == fail_at:
            return (
                "err Simulated failure"
                if target == "com"
                else json.dumps({"error": 10, "message": "Simulated failure", "data": []})
            )
        if target == "com":
            return "ok "
        params = msg["parameters"]
        if command == "write":
            digest.update(base64.b64decode(params["buffer"]))
        if command == "sha1":
            value = sha1() if sha1 else digest.hexdigest()
            return json.dumps({"error": 0, "message": value, "data": []})
        if command == "upgrade":
            return json.dumps({"error": 0, "message": installer_status, "data": []})
        return json.dumps({"error": 0, "message": "ok", "data": []})

    return script
