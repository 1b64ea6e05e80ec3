"""Loopback HTTP(S) servers for tests: real sockets on 127.0.0.1, no mocks.

The plumbing the test servers of the project and of third-party plugins share (a plugin's
tests import this module, never the project's ``tests/`` folder):

* ``LoopbackServer``: a context manager that runs a ``ThreadingHTTPServer`` on 127.0.0.1 (a
  free port) in a daemon thread, optionally behind TLS (a certificate and its key); ``port``,
  ``url``, and the requests its handler recorded (``Seen``, under ``lock``). A fixture
  subclasses it to hold the state its handler reads through ``self.server.owner``.
* ``LoopbackHandler``: a quiet HTTP/1.1 request handler with the answers misbehaving test
  servers give: ``send_status`` (a status, extra headers, a short body), ``send_bytes`` (200,
  or 206/416 for a ``Range: bytes=N-`` request, optionally after a delay or cut half-way) and
  ``send_cut`` (half a body, then the connection closed).
* ``range_start``: the first byte a ``Range: bytes=N-`` header asks for.
* ``closed_port``: a loopback port nothing listens on.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Generic, Self, TypeVar

__all__ = [
    "LoopbackHTTPServer",
    "LoopbackHandler",
    "LoopbackServer",
    "Seen",
    "closed_port",
    "range_start",
]


@dataclass(frozen=True)
class Seen:
    """One request a server received (``path`` as the fixture chose to record it)."""

    method: str
    path: str
    headers: dict[str, str]


OwnerT = TypeVar("OwnerT", bound="LoopbackServer")


class LoopbackHTTPServer(ThreadingHTTPServer, Generic[OwnerT]):
    """The socket server of a ``LoopbackServer``: 127.0.0.1, a free port, one thread a
    request; ``owner`` is the ``LoopbackServer`` whose state the handler reads."""

    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler], owner: OwnerT) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.owner = owner


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1, HTTPS with ``cert_chain`` (a context manager).

    ``handler`` answers the requests; it reaches this object as ``self.server.owner``.
    Each ``start`` begins a fresh list of recorded requests.
    """

    def __init__(
        self,
        handler: type[BaseHTTPRequestHandler],
        *,
        cert_chain: tuple[Path, Path] | None = None,
    ) -> None:
        self.handler = handler
        self.cert_chain = cert_chain  # (certificate, key) PEM files
        self.lock = threading.Lock()
        self.seen: list[Seen] = []
        self._server: LoopbackHTTPServer[Self] | None = None

    def start(self) -> Self:
        """Bind a free port and serve in a daemon thread."""
        with self.lock:
            self.seen = []
        server = LoopbackHTTPServer(self.handler, self)
        if self.cert_chain is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self.cert_chain)
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self._server = server
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.daemon = True
        thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (nothing if not started)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        assert self._server is not None, "the server is not started"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """``http(s)://127.0.0.1:<port>`` (no trailing slash)."""
        scheme = "https" if self.cert_chain is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def record(self, seen: Seen) -> None:
        """Add a request to ``requests`` (called by the handler)."""
        with self.lock:
            self.seen.append(seen)

    @property
    def requests(self) -> list[Seen]:
        """The requests recorded since ``start``, oldest first."""
        assert self._server is not None, "the server is not started"
        with self.lock:
            return list(self.seen)


class LoopbackHandler(BaseHTTPRequestHandler):
    """A request handler that logs nothing and speaks HTTP/1.1 (keep-alive)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def lower_headers(self) -> dict[str, str]:
        """The request headers, names in lower case."""
        return {k.lower(): v for k, v in self.headers.items()}

    def send_status(
        self, status: int, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> None:
        """Answer ``status`` with ``headers`` and ``body`` (empty by default)."""
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def send_bytes(
        self,
        data: bytes,
        *,
        use_range: bool = True,
        content_type: str | None = None,
        body_delay: float = 0.0,
        cut: bool = False,
    ) -> None:
        """Answer with ``data``: 200, or with ``use_range`` and a ``Range: bytes=N-`` header
        206 from N (416 when N is past the end). ``body_delay`` seconds pass between the
        headers and the body; ``cut`` sends half the body then closes (``send_cut``)."""
        start = range_start(self.headers.get("Range")) if use_range else None
        if start is not None:
            if start >= len(data):
                self.send_status(416, {"Content-Range": f"bytes */{len(data)}"})
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            body = data[start:]
        else:
            self.send_response(200)
            body = data
        self.send_header("Content-Length", str(len(body)))
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        self.end_headers()
        if body_delay:
            time.sleep(body_delay)
        if cut:
            self.send_cut(body)
            return
        self.wfile.write(body)

    def send_cut(self, body: bytes) -> None:
        """Send the first half of ``body`` (its headers already sent) and close the
        connection: the client sees a response shorter than its ``Content-Length``."""
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True


def range_start(value: str | None) -> int | None:
    """N of a ``bytes=N-...`` ``Range`` header value; None for anything else."""
    if not value or not value.startswith("bytes="):
        return None
    first = value[len("bytes=") :].split("-", 1)[0]
    return int(first) if first.isdigit() else None


def closed_port() -> int:
    """A loopback TCP port with nothing listening (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
