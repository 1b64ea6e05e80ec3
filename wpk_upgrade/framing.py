"""Reference socket framing: a 4-byte little-endian length, then the payload (reference §2.1).

Used on the local UNIX sockets (one request, one reply per connection) and, with the same
frame, on the agent transport. Oversized frames are refused with ``FrameTooLarge`` before their
body is read into memory.
"""

from __future__ import annotations

import asyncio
import socket
import struct

from .errors import ProtocolError

HEADER = struct.Struct("<I")
DEFAULT_MAX = 65536


class FrameTooLarge(ProtocolError):
    """A peer announced a frame larger than allowed."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"message of {size} bytes exceeds the maximum of {limit} bytes")


def encode(payload: bytes) -> bytes:
    """Frame ``payload``."""
    return HEADER.pack(len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader, limit: int = DEFAULT_MAX) -> bytes:
    """Read one frame. ``asyncio.IncompleteReadError`` on EOF, ``FrameTooLarge`` when big."""
    header = await reader.readexactly(HEADER.size)
    (size,) = HEADER.unpack(header)
    if size > limit:
        raise FrameTooLarge(size, limit)
    return await reader.readexactly(size)


async def discard(reader: asyncio.StreamReader, size: int, cap: int, timeout: float) -> bool:
    """Read and drop ``size`` bytes (up to ``cap``) so a reply can still be delivered."""
    if size > cap:
        return False
    try:
        async with asyncio.timeout(timeout):
            left = size
            while left:
                chunk = await reader.read(min(left, 1 << 16))
                if not chunk:
                    return False
                left -= len(chunk)
    except TimeoutError:
        return False
    return True


async def write_frame(writer: asyncio.StreamWriter, payload: bytes) -> None:
    """Write one frame and drain."""
    writer.write(encode(payload))
    await writer.drain()


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    parts = []
    left = size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed before the whole frame arrived")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def request_unix(path: str, payload: bytes, timeout: float = 30.0, limit: int = 1 << 26) -> bytes:
    """Blocking client: send one framed request to a UNIX socket and return the framed reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(encode(payload))
        (size,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
        if size > limit:
            raise FrameTooLarge(size, limit)
        return _recv_exact(sock, size)
