"""The manager daemon: wires configuration, plugins, store, sources, transport and sockets.

``Manager`` is a library object (tests and embedding tools drive it directly); ``run_manager``
is the thin process shell behind ``wpk-upgrade manager --config FILE``: it handles signals
and exits 0 after a graceful stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pluggy

from .admin import Admin
from .cache import WpkCache
from .config import ManagerConfig, load_manager_config
from .dispatcher import Dispatcher
from .drivers import STORES, TRANSPORTS, driver_class, load_options
from .errors import TaskCode, UpgradeCode, WpkUpgradeError
from .framing import FrameTooLarge, discard, read_frame, write_frame
from .hub import AgentRegistry
from .interfaces import TaskStore, Transport
from .logging_setup import EventLogPlugin, configure_manager_logging
from .pidlock import PidLock
from .plugin_manager import make_plugin_manager
from .protocol import (
    RequestRejected,
    dumps,
    parse_task_request,
    task_error_reply,
    upgrade_error_reply,
)
from .service import UpgradeService
from .sources import SourceRegistry, scheme_of
from .taskmanager import TaskManager

log = logging.getLogger(__name__)

READ_TIMEOUT = 30.0
DISCARD_CAP = 64 << 20

Handler = Callable[[bytes], Awaitable[dict[str, Any]]]


def open_store(config: ManagerConfig) -> TaskStore:
    """The task store driver named by the database URL's scheme (not opened yet)."""
    url = config.store_url
    scheme = scheme_of(url).split("+", 1)[0]
    if scheme == "postgres":
        scheme = "postgresql"
    cls = driver_class(STORES, scheme)
    options = load_options(cls, config.store.options, "store.options")
    store: TaskStore = cls(url, options)
    return store


def open_transport(config: ManagerConfig) -> Transport:
    """The configured transport driver."""
    name = config.transport.name or "tcp"
    cls = driver_class(TRANSPORTS, name)
    transport: Transport = cls(load_options(cls, config.transport.options, "transport.options"))
    return transport


class Manager:
    """A running manager node."""

    def __init__(self, config: ManagerConfig, pm: pluggy.PluginManager | None = None) -> None:
        self.config = config
        self.pm = pm or make_plugin_manager()
        self.store = open_store(config)
        self.transport = open_transport(config)
        self.sources = SourceRegistry(config.sources)
        self.cache = WpkCache(config.cache_dir)
        self.hub = AgentRegistry(self.store, config.node_name)
        self.tasks = TaskManager(self.store, self.pm, config.task_manager, config.node_name)
        self.dispatcher = Dispatcher(
            config, self.store, self.tasks, self.sources, self.cache, self.hub, self.pm
        )
        self.service = UpgradeService(
            config, self.store, self.pm, self.tasks, self.sources, self.dispatcher, self.hub
        )
        self.admin = Admin(config, self.store, self.sources)
        if not self.pm.has_plugin("event_log"):
            self.pm.register(EventLogPlugin(), name="event_log")
        self.hub.on_event = self._agent_event
        self.stop_event = asyncio.Event()
        self._servers: list[asyncio.base_events.Server] = []
        self.web: list[Any] = []  # HTTP API and metrics servers (api.WebServer)
        self._background: list[asyncio.Task[None]] = []
        # One manager per home: held from the start of start() to the end of stop().
        self.home_lock = PidLock(config.home / "var/run/manager.pid", "manager", config.home)

    async def _agent_event(self, agent_id: int, message: dict[str, Any]) -> dict[str, Any]:
        return await self.service.handle_raw(dumps(message))

    async def _serve_socket(self, path: Path, handler: Handler, oversized: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        limit = self.config.max_message_size

        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                try:
                    async with asyncio.timeout(READ_TIMEOUT):
                        raw = await read_frame(reader, limit)
                except FrameTooLarge as exc:
                    log.warning("%s: %s", path.name, exc)
                    reply = dumps({**oversized, "detail": str(exc)})
                    # Up to DISCARD_CAP the body is read through first (a client still
                    # writing then reads the answer without a broken pipe); a larger one is
                    # answered at once: the answer waits in the client's receive buffer.
                    if exc.size > DISCARD_CAP or await discard(
                        reader, exc.size, DISCARD_CAP, READ_TIMEOUT
                    ):
                        await write_frame(writer, reply)
                    return
                except (asyncio.IncompleteReadError, TimeoutError):
                    return
                try:
                    data = dumps(await handler(raw))
                except Exception:  # a client always gets an answer (hardening R1)
                    log.exception("%s: request could not be served", path.name)
                    data = dumps({**oversized, "detail": "the request could not be served"})
                await write_frame(writer, data)
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

        server = await asyncio.start_unix_server(connection, path=str(path), limit=limit + 16)
        os.chmod(path, 0o660)
        self._servers.append(server)

    async def _task_socket(self, raw: bytes) -> dict[str, Any]:
        admin_reply = await self.admin.maybe_handle(raw)  # extensions (admin.py)
        if admin_reply is not None:
            return admin_reply
        try:
            request = parse_task_request(raw)
        except RequestRejected as rej:
            log.info("task socket: refused request: %s", rej.detail)
            return rej.reply
        return await self.tasks.handle(request)

    async def start(self) -> None:
        """Lock the home, open the store, recover this node's tasks, bind sockets and the
        transport.

        Raises ``WpkUpgradeError`` before touching anything when another manager holds the
        home (its ``var/run/manager.pid`` lock: ``pidlock.PidLock``)."""
        cfg = self.config
        self.home_lock.acquire()
        for sub in ("queue/tasks", "var/upgrade", "var/run", "logs"):
            (cfg.home / sub).mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.store.open)
        await asyncio.to_thread(self.store.disconnect_node_agents, cfg.node_name)
        await self._recover()
        await self._serve_socket(
            cfg.task_socket, self._task_socket, task_error_reply(TaskCode.INVALID_MESSAGE)
        )
        await self._serve_socket(
            cfg.upgrade_socket,
            self.service.handle_raw,
            upgrade_error_reply(UpgradeCode.PARSING_ERROR),
        )
        await self.transport.serve(self.hub)
        await self._start_web()
        self._background = [
            asyncio.create_task(self.dispatcher.run(self.stop_event)),
            asyncio.create_task(self.tasks.run_sweeper(self.stop_event)),
        ]
        log.info(
            "manager node %s ready: %s, %s", cfg.node_name, cfg.upgrade_socket, cfg.task_socket
        )

    async def _start_web(self) -> None:
        """The metrics endpoint and the HTTP API, when configured (extra ``api``)."""
        if self.config.metrics.enabled:
            from .metrics import start_metrics

            self.web.append(await start_metrics(self))
        if self.config.api.enabled:
            from .api import start_api

            self.web.append(await start_api(self))

    async def _recover(self) -> None:
        """What the previous run of this node left (reference §8.5; ``on_restart``).

        Tasks past their timeout time out first (never pushed again). ``cancel`` (the
        reference): this node's Pending tasks become Cancelled; In progress ones are left to
        the agent's report or their timeout. ``resume`` (default): Pending tasks are run
        again (the dispatcher claims them); In progress ones whose push was cut before the
        installer phase are pushed again, oldest first; those whose installer may have
        started wait for the agent's report or their timeout.
        """
        node = self.config.node_name
        await self.tasks.sweep_once()
        if self.config.task_manager.on_restart == "cancel":
            count = await self.tasks.cancel_node_pending(node)
            if count:
                log.info("cancelled %d queued tasks left by the previous run", count)
            return
        cut = await asyncio.to_thread(self.store.interrupted_transfers, node)
        for task in cut:
            self.dispatcher.resume(task.task_id)
        if cut:
            log.info("pushing again %d tasks whose transfer the previous run cut", len(cut))
        pending = await asyncio.to_thread(self.store.pending_tasks, node, 0)
        if pending:
            log.info("resuming %d queued tasks left by the previous run", len(pending))

    async def stop(self) -> None:
        """Graceful stop: sockets closed, running transfers cancelled, store closed.

        Without the home lock (``start()`` refused, or already stopped) nothing here is
        ours: the sockets and the pid file belong to the manager holding the home."""
        self.stop_event.set()
        if not self.home_lock.held:
            self.sources.close()
            return
        for server in self._servers:
            server.close()
        while self.web:
            await self.web.pop().close()
        await self.transport.close()
        await self.hub.drain()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 10)
        for path in (self.config.upgrade_socket, self.config.task_socket):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.sources.close()
        await asyncio.to_thread(self.store.close)
        self.home_lock.release()

    async def run_until_stopped(self) -> None:
        await self.start()
        await self.stop_event.wait()
        await self.stop()


def setup_logging(level: str = "INFO") -> None:
    """Process-level logging for the daemons (library code never configures logging)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run_manager(config_path: str, log_level: str | None = None) -> int:
    """Process entry point; returns the exit status. ``log_level`` overrides
    ``[logging] level``."""
    setup_logging(log_level or "INFO")
    try:
        config = load_manager_config(config_path)
    except WpkUpgradeError as exc:
        log.error("%s", exc)
        return 2
    configure_manager_logging(config, log_level)

    async def main() -> int:
        try:
            manager = Manager(config)
        except WpkUpgradeError as exc:
            log.error("%s", exc)
            return 2
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, manager.stop_event.set)
        try:
            await manager.start()
        except (WpkUpgradeError, OSError) as exc:
            log.error("cannot start: %s", exc)
            await manager.stop()
            return 1
        await manager.stop_event.wait()
        await manager.stop()
        log.info("manager stopped")
        return 0

    return asyncio.run(main())
