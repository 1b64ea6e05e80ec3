"""The agent's local upgrade socket ``<home>/queue/sockets/upgrade`` (reference §2.1, §2.6).

A UNIX stream socket, mode 0660, with the reference framing (4-byte little-endian length, then
the payload; one request and one reply per connection). A request is the JSON command of target
``upgrade`` (``{"command":..,"parameters":{..}}``) and gets the same reply as through the
manager transport. A frame over ``max_message_size`` is drained (when not absurdly large) and
answered with error 2 "Command not found", as is a payload that is not UTF-8 JSON; the server
keeps serving either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path

from ..errors import AgentCode, WpkUpgradeError
from ..framing import FrameTooLarge, discard, read_frame, write_frame
from ..interfaces import RequestHandler
from .commands import reply

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
READ_TIMEOUT = 30.0


def _answers(path: Path) -> bool:
    """True when something accepts connections on the UNIX socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class LocalSocketServer:
    """Serves ``handler("upgrade", payload)`` on a UNIX socket until ``close()``."""

    def __init__(self, path: Path, handler: RequestHandler, max_message_size: int = 65536) -> None:
        self.path = Path(path)
        self.handler = handler
        self.max_message_size = max_message_size
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Bind (replacing a stale socket file), set mode 0660 and start serving.

        Raises ``WpkUpgradeError`` when another process already serves on the path.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket():
            if _answers(self.path):
                raise WpkUpgradeError(f"another agent is already listening on {self.path}")
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old_umask = os.umask(0o117)
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old_umask)
            os.chmod(self.path, SOCKET_MODE)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        except BaseException:
            sock.close()
            raise
        log.info("listening on %s", self.path)

    async def close(self) -> None:
        """Stop serving and remove the socket file."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            answer = await self._answer(reader)
            if answer is not None:
                await write_frame(writer, answer.encode())
        except (ConnectionError, OSError) as exc:
            log.debug("local socket client went away: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> str | None:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                frame = await read_frame(reader, self.max_message_size)
        except FrameTooLarge as exc:
            log.warning("local socket: refused request: %s", exc)
            await discard(reader, exc.size, 16 * self.max_message_size, 5.0)
            return reply(AgentCode.COMMAND_NOT_FOUND)
        except (asyncio.IncompleteReadError, TimeoutError):
            log.debug("local socket: client sent no complete frame")
            return None
        try:
            payload = frame.decode("utf-8")
        except UnicodeDecodeError:
            log.warning("local socket: refused request: payload is not UTF-8")
            return reply(AgentCode.COMMAND_NOT_FOUND)
        return await self.handler("upgrade", payload)
