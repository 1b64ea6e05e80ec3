"""A small user-space TCP proxy that adds delay and limits bandwidth (and can cut connections).

Each direction of each proxied connection behaves like a link of ``bandwidth`` bytes per second
followed by ``delay`` seconds of propagation: a chunk read at time t leaves the link at
``max(t, end of the previous chunk) + len / bandwidth`` and is written to the other side
``delay`` seconds later, in order. The round-trip time is therefore ``2 * delay`` plus the
serialization. ``cut()`` aborts every open connection (both sides see a reset), as a network
failure would; new connections are accepted as before.

``DelayProxy`` runs on the caller's event loop; ``ProxyThread`` runs one on its own thread
for blocking code (tests, ``bench_transfer.py``). Command line::

    python bench/delay_proxy.py --listen 127.0.0.1:9000 --target 127.0.0.1:1516 \\
        --delay 0.025 --bandwidth 12500000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
READ_SIZE = 16384


class _Link:
    """One direction: read, schedule by bandwidth and delay, write in order."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        delay: float,
        bandwidth: float | None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.delay = delay
        self.bandwidth = bandwidth
        self.queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        self.free_at = 0.0
        self.bytes = 0

    async def pump_in(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await self.reader.read(READ_SIZE):
                now = loop.time()
                start = max(now, self.free_at)
                self.free_at = start + (len(data) / self.bandwidth if self.bandwidth else 0.0)
                self.queue.put_nowait((self.free_at + self.delay, data))
        finally:
            self.queue.put_nowait((0.0, b""))

    async def pump_out(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await self.queue.get()
            if not data:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self.writer.write(data)
            self.bytes += len(data)
            await self.writer.drain()
        with contextlib.suppress(OSError, RuntimeError):
            if self.writer.can_write_eof():
                self.writer.write_eof()


class DelayProxy:
    """Forwards ``listen`` to ``target`` with ``delay`` (one way, seconds) and ``bandwidth``
    (bytes per second per direction, None for unlimited)."""

    def __init__(
        self,
        target: tuple[str, int],
        listen: tuple[str, int] = ("127.0.0.1", 0),
        delay: float = 0.0,
        bandwidth: float | None = None,
    ) -> None:
        self.target = target
        self.listen = listen
        self.delay = delay
        self.bandwidth = bandwidth
        self.connections = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def address(self) -> str:
        return f"{self.listen[0]}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, *self.listen, backlog=1024)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            if task is not None:
                self._tasks.discard(task)
            return
        self._writers.update((writer, up_writer))
        up = _Link(reader, up_writer, self.delay, self.bandwidth)
        down = _Link(up_reader, writer, self.delay, self.bandwidth)
        pumps = [up.pump_in(), up.pump_out(), down.pump_in(), down.pump_out()]
        try:
            await asyncio.gather(*pumps)
        except (OSError, ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self.bytes_up += up.bytes
            self.bytes_down += down.bytes
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()
            if task is not None:
                self._tasks.discard(task)

    def cut(self) -> int:
        """Abort every open connection (a network failure); returns how many were open."""
        count = len(self._writers) // 2
        for w in list(self._writers):
            w.transport.abort()
        return count

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class ProxyThread:
    """A ``DelayProxy`` on its own event-loop thread (``start``/``cut``/``stop`` block)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.proxy = DelayProxy(*args, **kwargs)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> ProxyThread:
        self._thread.start()
        self._run(self.proxy.start())
        return self

    @property
    def address(self) -> str:
        return self.proxy.address

    def cut(self) -> int:
        async def cut() -> int:
            return self.proxy.cut()

        return self._run(cut())

    def stop(self) -> None:
        self._run(self.proxy.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> ProxyThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--target", required=True)
    parser.add_argument("--delay", type=float, default=0.025, help="one-way delay, seconds")
    parser.add_argument("--bandwidth", type=float, default=None, help="bytes per second")
    args = parser.parse_args(argv)

    async def run() -> None:
        proxy = DelayProxy(_address(args.target), _address(args.listen), args.delay, args.bandwidth)
        await proxy.start()
        print(f"proxy {proxy.address} -> {args.target}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await proxy.close()

    started = time.monotonic()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    print(f"stopped after {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
