"""Manager and agent sides of the ``tcp`` transport (asyncio, one connection per agent).

The manager multiplexes requests by id over each agent's connection; the agent answers each
request in its own task and sends heartbeats. A connection silent for three heartbeats is
considered dead. The agent reconnects with capped exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from marshmallow import Schema, ValidationError, fields, post_load, validate

from wpk_upgrade.errors import ProtocolError
from wpk_upgrade.framing import FrameTooLarge
from wpk_upgrade.interfaces import (
    AgentHub,
    AgentLink,
    ManagerChannel,
    RequestHandler,
    Transport,
)
from wpk_upgrade.models import AgentInfo

from . import wire

log = logging.getLogger(__name__)


def split_address(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` allowed) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected host:port, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _address(value: str) -> None:
    try:
        split_address(value)
    except ValueError as exc:
        raise ValidationError(str(exc)) from exc


@dataclass(frozen=True)
class TcpOptions:
    """Options of the tcp transport (manager uses ``listen``, agents use ``address``)."""

    listen: str = "127.0.0.1:1516"
    address: str = "127.0.0.1:1516"
    heartbeat: float = 10.0
    hello_timeout: float = 10.0
    max_frame: int = 1 << 20
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0


class TcpOptionsSchema(Schema):
    listen = fields.String(load_default="127.0.0.1:1516", validate=_address)
    address = fields.String(load_default="127.0.0.1:1516", validate=_address)
    heartbeat = fields.Float(load_default=10.0, validate=validate.Range(min=0.1))
    hello_timeout = fields.Float(load_default=10.0, validate=validate.Range(min=0.1))
    max_frame = fields.Integer(load_default=1 << 20, validate=validate.Range(65536, 1 << 26))
    reconnect_min = fields.Float(load_default=0.5, validate=validate.Range(min=0.01))
    reconnect_max = fields.Float(load_default=30.0, validate=validate.Range(min=0.01))

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> TcpOptions:
        return TcpOptions(**data)


class _Connection:
    """Shared framing, write lock and reply futures of one open connection."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, options: TcpOptions
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.options = options
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.write_lock = asyncio.Lock()
        self.closed = False

    async def send(self, message: dict[str, Any]) -> None:
        if self.closed:
            raise ConnectionError("connection closed")
        async with self.write_lock:
            self.writer.write(wire.pack(message))
            await self.writer.drain()

    async def call(self, message: dict[str, Any], timeout: float) -> Any:
        """Send a message with a fresh id and wait for the answer with the same id."""
        ident = next(self.ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting[ident] = future
        try:
            await self.send({**message, "id": ident})
            async with asyncio.timeout(timeout):
                return await future
        finally:
            self.waiting.pop(ident, None)

    def answer(self, ident: Any, value: Any) -> None:
        future = self.waiting.get(ident) if isinstance(ident, int) else None
        if future is not None and not future.done():
            future.set_result(value)

    async def receive(self) -> dict[str, Any]:
        async with asyncio.timeout(self.options.heartbeat * 3):
            return await wire.receive(self.reader, self.options.max_frame)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(ConnectionError("connection closed"))
        self.writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self.writer.wait_closed()


class TcpAgentLink(AgentLink):
    """The manager's handle on one connected agent."""

    def __init__(self, agent_id: int, conn: _Connection) -> None:
        self.agent_id = agent_id
        self.conn = conn

    async def request(self, target: str, payload: str, timeout: float) -> str:
        reply = await self.conn.call(
            {"type": "request", "target": target, "payload": payload}, timeout
        )
        return str(reply)

    async def close(self) -> None:
        await self.conn.close()


class _ManagerChannel(ManagerChannel):
    def __init__(self, conn: _Connection) -> None:
        self.conn = conn

    async def send_event(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        reply = await self.conn.call({"type": "event", "message": message}, timeout)
        return reply if isinstance(reply, dict) else {}


class TcpTransport(Transport):
    """Agents over plain TCP (mutual TLS comes with the transport hardening)."""

    name = "tcp"
    config_schema = TcpOptionsSchema

    def __init__(self, config: TcpOptions | None = None) -> None:
        super().__init__(config or TcpOptions())
        self.options: TcpOptions = self.config
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_Connection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ manager side

    @property
    def bound_port(self) -> int | None:
        """The port actually bound (useful with ``listen = "127.0.0.1:0"``)."""
        if self._server is None or not self._server.sockets:
            return None
        return int(self._server.sockets[0].getsockname()[1])

    async def serve(self, hub: AgentHub) -> None:
        host, port = split_address(self.options.listen)

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if task is not None:
                self._tasks.add(task)
            try:
                await self._serve_agent(hub, reader, writer)
            except asyncio.CancelledError:
                pass  # shutdown; asyncio 3.11 logs a cancelled connection callback as an error
            finally:
                if task is not None:
                    self._tasks.discard(task)

        self._server = await asyncio.start_server(accept, host, port, limit=1 << 20)
        log.info("tcp transport listening on %s:%s", host, self.bound_port)

    async def _serve_agent(
        self, hub: AgentHub, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = writer.get_extra_info("peername")
        conn = _Connection(reader, writer, self.options)
        self._conns.add(conn)
        link: TcpAgentLink | None = None
        try:
            try:
                async with asyncio.timeout(self.options.hello_timeout):
                    info = wire.parse_hello(await wire.receive(reader, self.options.max_frame))
            except (ProtocolError, TimeoutError, asyncio.IncompleteReadError) as exc:
                log.warning("tcp: refused %s: %s", peer, exc or "no hello in time")
                with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                    await conn.send({"type": "refused", "reason": str(exc) or "no hello"})
                return
            link = TcpAgentLink(info.agent_id, conn)
            await conn.send({"type": "welcome"})
            await hub.agent_connected(info, link)
            await self._manager_loop(hub, conn, info.agent_id)
        except (ConnectionError, OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except (ProtocolError, FrameTooLarge) as exc:
            log.warning("tcp: dropping agent at %s: %s", peer, exc)
        finally:
            await conn.close()
            self._conns.discard(conn)
            if link is not None:
                await hub.agent_disconnected(link.agent_id, link)

    async def _manager_loop(self, hub: AgentHub, conn: _Connection, agent_id: int) -> None:
        while True:
            msg = await conn.receive()
            kind = msg["type"]
            if kind == "response":
                conn.answer(msg.get("id"), msg.get("payload", ""))
            elif kind == "ping":
                await conn.send({"type": "pong"})
            elif kind == "event":
                self._spawn(self._event(hub, conn, agent_id, msg))
            elif kind == "pong":
                continue
            else:
                log.warning("tcp: agent %03d sent an unknown message type %r", agent_id, kind)

    async def _event(
        self, hub: AgentHub, conn: _Connection, agent_id: int, msg: dict[str, Any]
    ) -> None:
        message = msg.get("message")
        reply = await hub.agent_event(agent_id, message if isinstance(message, dict) else {})
        with contextlib.suppress(ConnectionError, OSError):
            await conn.send({"type": "event_reply", "id": msg.get("id"), "reply": reply})

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            await conn.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    # ------------------------------------------------------------------ agent side

    async def run_agent(
        self,
        identity: Callable[[], AgentInfo],
        on_request: RequestHandler,
        on_connected: Callable[[ManagerChannel], Awaitable[None]],
        stop: asyncio.Event,
    ) -> None:
        host, port = split_address(self.options.address)
        delay = self.options.reconnect_min
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
            except OSError as exc:
                log.info(
                    "tcp: cannot reach manager %s:%s (%s); retrying in %.1fs",
                    host,
                    port,
                    exc.strerror or exc,
                    delay,
                )
            else:
                conn = _Connection(reader, writer, self.options)
                try:
                    await self._agent_session(conn, identity, on_request, on_connected, stop)
                    delay = self.options.reconnect_min
                except (
                    ConnectionError,
                    OSError,
                    asyncio.IncompleteReadError,
                    TimeoutError,
                    ProtocolError,
                ) as exc:
                    log.info("tcp: manager connection ended: %s", exc or type(exc).__name__)
                finally:
                    await conn.close()
            if stop.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
            delay = min(delay * 2, self.options.reconnect_max)

    async def _agent_session(
        self,
        conn: _Connection,
        identity: Callable[[], AgentInfo],
        on_request: RequestHandler,
        on_connected: Callable[[ManagerChannel], Awaitable[None]],
        stop: asyncio.Event,
    ) -> None:
        await conn.send(wire.hello(identity()))
        async with asyncio.timeout(self.options.hello_timeout):
            answer = await wire.receive(conn.reader, self.options.max_frame)
        if answer["type"] != "welcome":
            raise ProtocolError(f"manager refused us: {answer.get('reason', answer['type'])}")
        log.info("tcp: connected to manager")
        tasks: set[asyncio.Task[Any]] = set()

        def spawn(coro: Awaitable[Any]) -> None:
            task = asyncio.ensure_future(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        async def answer_request(msg: dict[str, Any]) -> None:
            target, payload = msg.get("target"), msg.get("payload")
            if not isinstance(target, str) or not isinstance(payload, str):
                reply = "err Invalid request"
            else:
                try:
                    reply = await on_request(target, payload)
                except Exception:
                    log.exception("tcp: request handler failed")
                    reply = "err Internal error"
            with contextlib.suppress(ConnectionError, OSError):
                await conn.send({"type": "response", "id": msg.get("id"), "payload": reply})

        async def heartbeat() -> None:
            while True:
                await asyncio.sleep(self.options.heartbeat)
                await conn.send({"type": "ping"})

        spawn(heartbeat())
        spawn(on_connected(_ManagerChannel(conn)))
        stopper = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                receiver = asyncio.ensure_future(conn.receive())
                done, _ = await asyncio.wait(
                    {receiver, stopper}, return_when=asyncio.FIRST_COMPLETED
                )
                if receiver not in done:
                    receiver.cancel()
                    break
                msg = receiver.result()
                kind = msg["type"]
                if kind == "request":
                    spawn(answer_request(msg))
                elif kind == "event_reply":
                    conn.answer(msg.get("id"), msg.get("reply"))
                elif kind == "ping":
                    await conn.send({"type": "pong"})
        finally:
            stopper.cancel()
            for task in list(tasks):
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
