"""Manager and agent sides of the ``tcp`` transport (asyncio, one connection per agent).

The manager multiplexes requests by id over each agent's connection; the agent answers each
request in its own task and sends heartbeats. A connection silent for three heartbeats is
considered dead. The agent reconnects with capped exponential backoff.

Options (``[transport] options`` on the manager, ``[manager] options`` on an agent):

==================  =========  ===============================================================
``listen``          manager    ``host:port`` to accept agents on (default ``127.0.0.1:1516``)
``address``         agent      ``host:port`` of the manager
``heartbeat``       both       seconds between an agent's pings (default 10)
``hello_timeout``   both       seconds for the TLS handshake and the hello (default 10)
``max_frame``       both       largest message accepted, bytes (default 1 MiB)
``reconnect_min``,  agent      reconnection backoff bounds, seconds (0.5, 30)
``reconnect_max``
``tls``             both       unset: TLS when ``ca``/``cert``/``key`` are set; true/false
``ca``              both       manager: the agent CA it trusts; agent: the manager CA
``cert``, ``key``   both       this side's certificate and private key (PEM)
``crl``             manager    revocation list of the agent CA (PEM or DER), re-read on change
``server_name``     agent      name the manager certificate must carry (default: ``address``)
``backlog``         manager    listen backlog (default 1024; many agents connect at once)
``tls_read_buffer`` manager    bytes of asyncio's TLS read buffer per connection (default
                               16384; asyncio's own is 256 KiB, allocated for every agent)
==================  =========  ===============================================================

Mutual TLS (``tls.py``) is on when certificates are configured (``tls`` unset) or when
``tls = true``; ``tls = false`` forces plain TCP (tests, loopback labs). With TLS the manager
identifies an agent by its client certificate (``CN=agent:<id>``): a hello whose id differs
from the certificate's, a certificate without an agent id, or a revoked one (``crl``) is refused
and logged, as are failed handshakes (no certificate, an unknown CA).

Each received ``ping`` is passed to the hub's optional ``agent_seen(agent_id, link, every)``
(``hub.AgentRegistry`` records "last seen" at most once per ``every`` seconds per agent).
The manager's ``TcpAgentLink.features`` holds what the agent announced in its hello
(``wire.py``); the agent announces ``bin`` plus the ``features`` attribute of the object whose
bound method answers its requests (``CommandHandler.features``), if any.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from marshmallow import Schema, ValidationError, fields, post_load, validate, validates_schema

from wpk_upgrade.errors import ConfigError, ProtocolError, UpgradeCode
from wpk_upgrade.framing import FrameTooLarge, encode
from wpk_upgrade.interfaces import (
    EMPTY_BUFFER,
    AgentHub,
    AgentLink,
    ManagerChannel,
    RequestHandler,
    Transport,
)
from wpk_upgrade.models import AgentInfo
from wpk_upgrade.protocol import upgrade_error_reply
from wpk_upgrade.untrusted import clip

from . import tls, wire

log = logging.getLogger(__name__)

#: How often the manager looks whether its CRL file changed (seconds).
CRL_CHECK_INTERVAL = 2.0


def split_address(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` allowed) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected host:port, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _is_loopback(host: str) -> bool:
    """``host`` is a loopback address or ``localhost`` (empty: every interface, not loopback)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    tls: bool | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    crl: str | None = None
    server_name: str | None = None
    backlog: int = 1024
    tls_read_buffer: int = 16384

    @property
    def tls_enabled(self) -> bool:
        """TLS is on when asked, or (``tls`` unset) when certificates are configured."""
        if self.tls is not None:
            return self.tls
        return bool(self.ca or self.cert or self.key)


class TcpOptionsSchema(Schema):
    listen = fields.String(load_default="127.0.0.1:1516", validate=_address)
    address = fields.String(load_default="127.0.0.1:1516", validate=_address)
    heartbeat = fields.Float(load_default=10.0, validate=validate.Range(min=0.1))
    hello_timeout = fields.Float(load_default=10.0, validate=validate.Range(min=0.1))
    max_frame = fields.Integer(load_default=1 << 20, validate=validate.Range(65536, 1 << 26))
    reconnect_min = fields.Float(load_default=0.5, validate=validate.Range(min=0.01))
    reconnect_max = fields.Float(load_default=30.0, validate=validate.Range(min=0.01))
    tls = fields.Boolean(load_default=None, allow_none=True)
    ca = fields.String(load_default=None, allow_none=True)
    cert = fields.String(load_default=None, allow_none=True)
    key = fields.String(load_default=None, allow_none=True)
    crl = fields.String(load_default=None, allow_none=True)
    server_name = fields.String(load_default=None, allow_none=True)
    backlog = fields.Integer(load_default=1024, validate=validate.Range(1, 65535))
    tls_read_buffer = fields.Integer(
        load_default=16384, strict=True, validate=validate.Range(4096, 1 << 20)
    )

    @validates_schema
    def check(self, data: dict[str, Any], **_: Any) -> None:
        tls_on = data.get("tls")
        if tls_on is None:
            tls_on = bool(data.get("ca") or data.get("cert") or data.get("key"))
        if tls_on:
            missing = [k for k in ("ca", "cert", "key") if not data.get(k)]
            if missing:
                raise ValidationError(
                    f"mutual TLS needs ca, cert and key (missing: {', '.join(missing)})",
                    missing[0],
                )

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
        #: serial of the peer's client certificate and who it is (mutual TLS, manager side)
        self.cert_serial: int | None = None
        self.peer = ""
        #: silence after which the peer is taken for dead: three heartbeats (the longer of
        #: ours and, on the manager, the one the agent announced)
        self.idle_timeout = options.heartbeat * 3

    async def send(self, message: dict[str, Any], attachment: bytes | None = None) -> None:
        """One message (and the raw frame announced by its ``bin``, written together)."""
        if self.closed:
            raise ConnectionError("connection closed")
        await self._write(self._frame(message, attachment))

    @staticmethod
    def _frame(message: dict[str, Any], attachment: bytes | None) -> bytes:
        data = wire.pack(message)
        if attachment is not None:
            data += encode(attachment)
        return data

    async def _write(self, data: bytes) -> None:
        async with self.write_lock:
            self.writer.write(data)
            await self.writer.drain()

    async def call(
        self, message: dict[str, Any], timeout: float, attachment: bytes | None = None
    ) -> Any:
        """Send a message with a fresh id and wait for the answer with the same id."""
        ident = next(self.ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting[ident] = future
        try:
            if self.closed:
                raise ConnectionError("connection closed")
            data = self._frame({**message, "id": ident}, attachment)
            # Nothing of the request is kept while its answer is awaited: with a window of
            # chunks in flight to hundreds of agents, held chunks were most of the memory.
            del message, attachment
            await self._write(data)
            del data
            async with asyncio.timeout(timeout):
                return await future
        finally:
            self.waiting.pop(ident, None)

    def answer(self, ident: Any, value: Any) -> None:
        future = self.waiting.get(ident) if isinstance(ident, int) else None
        if future is not None and not future.done():
            future.set_result(value)

    async def receive(self) -> dict[str, Any]:
        """The next message; a request announcing ``bin`` gets its buffer spliced back."""
        async with asyncio.timeout(self.idle_timeout):
            msg = await wire.receive(self.reader, self.options.max_frame)
            if msg["type"] == "request" and "bin" in msg:
                raw = await wire.receive_attachment(self.reader, self.options.max_frame)
                payload = msg.get("payload")
                if not isinstance(payload, str):
                    raise ProtocolError("request with bin but no payload text")
                msg["payload"] = wire.splice_buffer(payload, msg.pop("bin"), raw)
            return msg

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(ConnectionError("connection closed"))
        self.writer.close()
        with contextlib.suppress(OSError, ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


class TcpAgentLink(AgentLink):
    """The manager's handle on one connected agent; ``features`` as announced in its hello."""

    def __init__(
        self, agent_id: int, conn: _Connection, features: frozenset[str] = frozenset()
    ) -> None:
        self.agent_id = agent_id
        self.conn = conn
        self.features = features

    async def request(self, target: str, payload: str, timeout: float) -> str:
        message: dict[str, Any] = {"type": "request", "target": target, "payload": payload}
        attachment = None
        if target == "upgrade" and "bin" in self.features and len(payload) > wire.BIN_MIN:
            lifted = wire.lift_buffer(payload)
            if lifted is not None:
                message["payload"], message["bin"], attachment = lifted
                del lifted
        pending = self.conn.call(message, timeout, attachment)
        del payload, message, attachment  # held by ``call`` only until written (see there)
        return str(await pending)

    async def request_data(self, target: str, payload: str, data: bytes, timeout: float) -> str:
        """With ``bin``: the chunk goes as the raw frame after the message, never encoded."""
        if "bin" not in self.features:
            return await super().request_data(target, payload, data, timeout)
        position = payload.index(EMPTY_BUFFER) + len(EMPTY_BUFFER) - 1
        message = {"type": "request", "target": target, "payload": payload, "bin": position}
        pending = self.conn.call(message, timeout, data)
        del payload, message, data  # held by ``call`` only until written (see there)
        return str(await pending)

    async def close(self) -> None:
        await self.conn.close()


class _ManagerChannel(ManagerChannel):
    def __init__(self, conn: _Connection) -> None:
        self.conn = conn

    async def send_event(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        reply = await self.conn.call({"type": "event", "message": message}, timeout)
        return reply if isinstance(reply, dict) else {}


class _Refused(Exception):
    """A connection the manager refuses; ``reply``: whether the peer can be told why."""

    def __init__(self, reason: str, reply: bool = True) -> None:
        super().__init__(reason)
        self.reply = reply


def describe_error(exc: BaseException) -> str:
    """A short text for a connection or TLS failure (for the logs)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def handler_features(on_request: RequestHandler) -> tuple[str, ...]:
    """The protocol extensions a request handler declares (``features`` of its owner)."""
    owner = getattr(on_request, "__self__", None)
    value = getattr(owner, "features", None) or getattr(on_request, "features", None) or ()
    return tuple(str(v) for v in value)


class TcpTransport(Transport):
    """Agents over TCP, with mutual TLS when certificates are configured."""

    name = "tcp"
    config_schema = TcpOptionsSchema

    def __init__(self, config: TcpOptions | None = None) -> None:
        super().__init__(config or TcpOptions())
        self.options: TcpOptions = self.config
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_Connection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ssl: ssl.SSLContext | None = None
        self._crl: tls.RevocationList | None = None

    def check(self, role: Literal["manager", "agent"]) -> None:
        """With TLS: this side's certificate, key and CA load, and (manager) the CRL is a
        revocation list signed by the agent CA. ``ConfigError`` naming the file otherwise."""
        opts = self.options
        if role == "agent":
            if opts.tls_enabled:
                tls.client_context(opts.ca, opts.cert, opts.key)
            return
        _, crl = self._manager_tls()
        if crl is not None:
            try:
                crl.is_revoked(0)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"tcp transport: crl {opts.crl}: {exc}") from exc

    def _manager_tls(self) -> tuple[ssl.SSLContext | None, tls.RevocationList | None]:
        """The manager's TLS context and CRL (None, None for plain TCP); ``ConfigError`` when
        a file is missing or does not load. A CRL that exists but is unusable is not refused
        here: the manager then refuses every agent (fail closed)."""
        opts = self.options
        if not opts.tls_enabled:
            if opts.crl:
                raise ConfigError("tcp transport: crl needs TLS (ca, cert and key)")
            return None, None
        context = tls.server_context(opts.ca, opts.cert, opts.key)
        if not opts.crl:
            return context, None
        if not Path(opts.crl).is_file():
            raise ConfigError(f"tcp transport: crl {opts.crl} does not exist")
        return context, tls.RevocationList(opts.crl, opts.ca)

    # ------------------------------------------------------------------ manager side

    @property
    def bound_port(self) -> int | None:
        """The port actually bound (useful with ``listen = "127.0.0.1:0"``)."""
        if self._server is None or not self._server.sockets:
            return None
        return int(self._server.sockets[0].getsockname()[1])

    async def serve(self, hub: AgentHub) -> None:
        host, port = split_address(self.options.listen)
        opts = self.options
        self._ssl, self._crl = self._manager_tls()
        if self._ssl is not None:
            tls.set_read_buffer(opts.tls_read_buffer)
        if self._crl is not None:
            self._spawn(self._watch_crl(self._crl))

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

        self._server = await asyncio.start_server(
            accept, host, port, limit=1 << 20, backlog=opts.backlog
        )
        log.info(
            "tcp transport listening on %s:%s (%s)",
            host,
            self.bound_port,
            "mutual TLS" if self._ssl else "plain TCP, no TLS",
        )
        if self._ssl is None and not _is_loopback(host):
            log.warning(
                "tcp transport: plain TCP on %s: any host that reaches this port can connect "
                "as any agent; configure ca, cert and key (mutual TLS) or listen on 127.0.0.1",
                host,
            )

    async def _handshake(self, writer: asyncio.StreamWriter, peer: str) -> tuple[int, int]:
        """TLS server handshake; returns the agent id and serial of the client certificate.

        Raises ``_Refused``. Must be the first await of the connection (nothing read before).
        """
        assert self._ssl is not None
        try:
            await writer.start_tls(self._ssl, ssl_handshake_timeout=self.options.hello_timeout)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            raise _Refused(f"TLS handshake failed: {describe_error(exc)}", reply=False) from exc
        try:
            cert = tls.peer_certificate(writer.get_extra_info("ssl_object"))
        except ValueError as exc:
            raise _Refused(f"unreadable client certificate: {exc}") from exc
        if cert is None:
            raise _Refused("no client certificate")
        agent_id = tls.agent_id_of(cert)
        if agent_id is None:
            raise _Refused(
                f"the client certificate names no agent ({cert.subject.rfc4514_string()})"
            )
        if self._crl is not None:
            try:
                revoked = self._crl.is_revoked(cert.serial_number)
            except (OSError, ValueError) as exc:
                log.error("tcp: revocation list unusable, refusing every agent: %s", exc)
                raise _Refused("revocation list unusable") from exc
            if revoked:
                raise _Refused(
                    f"the certificate of agent {agent_id:03d} is revoked "
                    f"(serial {cert.serial_number:x})"
                )
        return agent_id, cert.serial_number

    async def _serve_agent(
        self, hub: AgentHub, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        address = writer.get_extra_info("peername")
        peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        cert_id: int | None = None
        serial: int | None = None
        if self._ssl is not None:
            try:
                cert_id, serial = await self._handshake(writer, peer)
            except _Refused as refusal:
                log.warning("tcp: refused %s: %s", peer, refusal)
                await self._refuse(writer, str(refusal) if refusal.reply else None)
                return
        conn = _Connection(reader, writer, self.options)
        conn.cert_serial = serial
        conn.peer = f"agent {cert_id:03d} at {peer}" if cert_id is not None else peer
        self._conns.add(conn)
        link: TcpAgentLink | None = None
        try:
            try:
                async with asyncio.timeout(self.options.hello_timeout):
                    msg = await wire.receive(reader, self.options.max_frame)
                info = wire.parse_hello(msg)
            except (ProtocolError, TimeoutError, asyncio.IncompleteReadError) as exc:
                log.warning("tcp: refused %s: %s", peer, exc or "no hello in time")
                with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                    await conn.send({"type": "refused", "reason": str(exc) or "no hello"})
                return
            if cert_id is not None and info.agent_id != cert_id:
                reason = (
                    f"hello claims agent {info.agent_id:03d} but the certificate is for "
                    f"agent {cert_id:03d}"
                )
                log.warning("tcp: refused %s: %s", peer, reason)
                with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                    await conn.send({"type": "refused", "reason": reason})
                return
            link = TcpAgentLink(info.agent_id, conn, wire.parse_features(msg))
            conn.idle_timeout = 3 * max(self.options.heartbeat, wire.parse_heartbeat(msg))
            await conn.send({"type": "welcome"})
            await hub.agent_connected(info, link)
            await self._manager_loop(hub, conn, link)
        except (ConnectionError, OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except (ProtocolError, FrameTooLarge) as exc:
            log.warning("tcp: dropping agent at %s: %s", peer, exc)
        finally:
            await conn.close()
            self._conns.discard(conn)
            if link is not None:
                await hub.agent_disconnected(link.agent_id, link)

    @staticmethod
    async def _refuse(writer: asyncio.StreamWriter, reason: str | None) -> None:
        """Tell the peer why (when the channel works), then close."""
        if reason is not None:
            with contextlib.suppress(ConnectionError, OSError, RuntimeError, TimeoutError):
                writer.write(wire.pack({"type": "refused", "reason": reason}))
                await asyncio.wait_for(writer.drain(), 5)
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 5)

    async def _manager_loop(self, hub: AgentHub, conn: _Connection, link: TcpAgentLink) -> None:
        agent_id = link.agent_id
        seen = getattr(hub, "agent_seen", None)
        while True:
            msg = await conn.receive()
            kind = msg["type"]
            if kind == "response":
                conn.answer(msg.get("id"), msg.get("payload", ""))
            elif kind == "ping":
                if seen is not None:
                    seen(agent_id, link, self.options.heartbeat)
                await conn.send({"type": "pong"})
            elif kind == "event":
                self._spawn(self._event(hub, conn, agent_id, msg))
            elif kind == "pong":
                continue
            else:
                log.warning("tcp: agent %03d sent an unknown message type %s", agent_id, clip(kind))

    async def _event(
        self, hub: AgentHub, conn: _Connection, agent_id: int, msg: dict[str, Any]
    ) -> None:
        message = msg.get("message")
        try:
            reply = await hub.agent_event(agent_id, message if isinstance(message, dict) else {})
        except Exception:  # an event always gets a coded reply, never a lost task exception
            log.exception("tcp: agent %03d: event handler failed", agent_id)
            reply = upgrade_error_reply(UpgradeCode.TASK_MANAGER_COMMUNICATION)
        with contextlib.suppress(ConnectionError, OSError):
            await conn.send({"type": "event_reply", "id": msg.get("id"), "reply": reply})

    async def _watch_crl(self, crl: tls.RevocationList) -> None:
        """Every ``CRL_CHECK_INTERVAL`` seconds: when the CRL file changed, drop the connected
        agents whose certificate it now revokes (``wpk-upgrade ca revoke`` needs no manager
        restart, and a revoked agent does not stay connected until it reconnects)."""
        broken = False
        while True:
            await asyncio.sleep(CRL_CHECK_INTERVAL)
            try:
                changed = crl.refresh()
            except (OSError, ValueError) as exc:
                if not broken:
                    log.error("tcp: revocation list unusable, refusing new agents: %s", exc)
                broken = True
                continue
            broken = False
            if not changed:
                continue
            for conn in list(self._conns):
                serial = conn.cert_serial
                if serial is not None and not conn.closed and crl.is_revoked(serial):
                    log.warning(
                        "tcp: dropping %s: its certificate was revoked (serial %x)",
                        conn.peer,
                        serial,
                    )
                    await conn.close()

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
        opts = self.options
        context = tls.client_context(opts.ca, opts.cert, opts.key) if opts.tls_enabled else None
        features = (*wire.TRANSPORT_FEATURES, *handler_features(on_request))
        delay = opts.reconnect_min
        while not stop.is_set():
            try:
                if context is None:
                    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
                else:
                    reader, writer = await asyncio.open_connection(
                        host,
                        port,
                        limit=1 << 20,
                        ssl=context,
                        server_hostname=opts.server_name or host,
                        ssl_handshake_timeout=opts.hello_timeout,
                    )
            except (OSError, TimeoutError) as exc:
                # a TLS failure (the manager's certificate, its name) is a configuration
                # matter; a manager that is down is routine
                log.log(
                    logging.WARNING if isinstance(exc, ssl.SSLError) else logging.INFO,
                    "tcp: cannot reach manager %s:%s (%s); retrying in %.1fs",
                    host,
                    port,
                    describe_error(exc),
                    delay,
                )
            else:
                conn = _Connection(reader, writer, opts)
                try:
                    await self._agent_session(
                        conn, identity, features, on_request, on_connected, stop
                    )
                    delay = opts.reconnect_min
                except (
                    ConnectionError,
                    OSError,
                    asyncio.IncompleteReadError,
                    TimeoutError,
                    ProtocolError,
                ) as exc:
                    # refused (revoked, another agent's id, bad hello) or a protocol fault is
                    # worth an operator's eye; a dropped connection is routine
                    level = logging.WARNING if isinstance(exc, ProtocolError) else logging.INFO
                    log.log(level, "tcp: manager connection ended: %s", describe_error(exc))
                finally:
                    await conn.close()
            if stop.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
            delay = min(delay * 2, opts.reconnect_max)

    async def _agent_session(
        self,
        conn: _Connection,
        identity: Callable[[], AgentInfo],
        features: tuple[str, ...],
        on_request: RequestHandler,
        on_connected: Callable[[ManagerChannel], Awaitable[None]],
        stop: asyncio.Event,
    ) -> None:
        await conn.send(wire.hello(identity(), features, self.options.heartbeat))
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
                elif kind == "refused":
                    raise ProtocolError(f"manager dropped us: {msg.get('reason', '')}")
        finally:
            stopper.cancel()
            for task in list(tasks):
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
