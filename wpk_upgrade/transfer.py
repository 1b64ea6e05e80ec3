"""Pushing a WPK to one agent: the reference command sequence, or our windowed resumable one.

Reference exchange (reference §7.1-7.3; ``transfer_mode = "reference"``, and always for legacy
agents, older agents and agents that do not announce the extensions): ``lock_restart`` (always
the legacy ``com`` form), ``open`` (retried), one ``write`` per chunk, each waiting for its
answer (stop-and-wait), ``close``, ``sha1`` (compared case-insensitively, a reference bug
fixed), then ``upgrade``. Agents at v4.1.0 or later get the JSON commands of target
``upgrade``; older agents the legacy text commands of target ``com`` (raw chunk bytes carried as
latin-1 text).

Windowed exchange (``transfer_mode = "windowed"``, the default, for JSON agents whose link
announces the ``offset``, ``resume`` and ``sha256`` features, see ``wpk_transport_tcp.wire``):

1. ``lock_restart``;
2. ``open`` with ``{"mode":"resume","file":F,"size":N,"sha1":..,"sha256":..}``: the agent
   answers how many bytes of this very file it already holds (0 for a new transfer);
3. ``write`` commands carrying ``offset``, up to ``window`` of them in flight at once; the
   acknowledged contiguous prefix is the progress reported;
4. ``close``, then ``sha1`` and ``sha256`` compared with the expected digests (a mismatch after
   a resumed transfer starts the file over once);
5. ``upgrade``, as in the reference.

When the agent's connection is lost before step 5 (agent restart, network cut), the pusher waits
up to ``resume_timeout`` seconds for the agent to come back (``reconnect``), then starts again at
step 1; step 2 tells it where to continue, so only the rest is sent (at most
``resume_attempts`` times). After a manager restart the next push of the task does the same.
Lost during step 5, the agent's copy of the WPK decides once it is back: still there (it is
deleted only once unpacked, just before the installer runs), ``upgrade`` is sent again; gone,
the installer may have run, and the task waits for the agent's report (``push`` returns
``UNKNOWN``).
Each failing step raises ``UpgradeError`` with the reference code (18 to 23) and a detail.

Every transfer reads the WPK from the one cached file (opened per transfer, never copied).
A ``ChunkBudget`` shared by a manager's pushes bounds the bytes of chunks read and not yet
acknowledged across all of them (``upgrade.max_inflight_mb``): with hundreds of transfers in
flight, chunks waiting for a slow connection were most of the manager's memory. Each push may
always have one chunk in flight, so none waits forever for the others.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from . import versions
from .errors import UpgradeCode, UpgradeError
from .interfaces import AgentLink
from .models import WpkRef

log = logging.getLogger(__name__)

JSON_PROTOCOL_SINCE = "v4.1.0"
#: What an agent must announce for the windowed, resumable transfer.
WINDOW_FEATURES = frozenset({"offset", "resume", "sha256"})
TRANSFER_MODES = ("windowed", "reference")
#: Agent reply code "Upgrade module is disabled or not ready yet" (an agent just restarted).
NOT_READY = 1
UNSUPPORTED_MODE = 4
#: What ``push`` returns when the agent's installer may have run but its answer was lost.
UNKNOWN = "unknown"

Progress = Callable[[int, int], None]
Reconnect = Callable[[AgentLink], Awaitable[AgentLink | None]]


@dataclass(frozen=True)
class TransferSettings:
    """Knobs of one push."""

    chunk_size: int = 32768
    command_timeout: float = 60.0
    installer_timeout: float = 600.0
    open_attempts: int = 10
    open_retry_delay: float = 1.0
    mode: str = "windowed"
    window: int = 16
    resume_timeout: float = 300.0
    resume_attempts: int = 5
    #: windowed agents: how long "not ready" answers to ``open`` are waited out (an agent
    #: that has just started refuses upgrades during its start-up result check, 30 s)
    not_ready_wait: float = 60.0


class ChunkBudget:
    """Bytes of WPK chunks that the pushes sharing it hold at once (read from the cache, not
    yet answered). Used from one event loop."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.used = 0

    def take(self, size: int, *, force: bool = False) -> bool:
        """Count ``size`` bytes if they fit (always with ``force``); False otherwise."""
        if not force and self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


@dataclass
class TransferStats:
    """What one push did: ``bytes_sent`` counts chunk bytes sent (re-sent ones included)."""

    mode: str = "reference"
    total: int = 0
    bytes_sent: int = 0
    resumed_at: list[int] = field(default_factory=list)
    reconnects: int = 0
    seconds: float = 0.0
    #: from the first ``write`` sent to the last one answered (all attempts added up)
    data_seconds: float = 0.0


@dataclass(frozen=True)
class Reply:
    """An agent's answer reduced to success and data (reference C067), plus its code."""

    ok: bool
    data: str
    code: int | None = None


class LinkLost(UpgradeError):
    """The agent's connection ended during a command (the push may resume)."""


class _Restart(Exception):
    """The agent's copy does not match after a resumed transfer: send the file again."""


class _NoResume(Exception):
    """The agent refused ``open`` in resume mode: use the reference exchange."""


def parse_json_reply(text: str) -> Reply:
    """``{"error":0,"message":M}`` -> ok with data M; anything else is a failure."""
    try:
        obj = json.loads(text)
    except ValueError:
        return Reply(False, text)
    if not isinstance(obj, dict) or not isinstance(obj.get("error"), int):
        return Reply(False, "Unknown error from agent.")
    message = obj.get("message")
    data = message if isinstance(message, str) else ""
    return Reply(obj["error"] == 0, data, obj["error"])


def parse_legacy_reply(text: str) -> Reply:
    """``ok <data>`` is a success; the data is the text after the first space."""
    if text.startswith("ok"):
        return Reply(True, text[3:] if len(text) > 2 else "")
    return Reply(False, text[4:] if text.startswith("err ") else text)


def uses_json(agent_version: str | None) -> bool:
    """True when the agent speaks the JSON command set (its current version >= v4.1.0)."""
    current = versions.extract(agent_version)
    if current is None:
        return True
    return versions.compare(current, JSON_PROTOCOL_SINCE) >= 0


def link_features(link: AgentLink) -> frozenset[str]:
    """The protocol extensions the agent behind ``link`` announced (none if unknown)."""
    value = getattr(link, "features", None)
    return frozenset(value) if value else frozenset()


def _json_command(command: str, **parameters: Any) -> str:
    return json.dumps({"command": command, "parameters": parameters}, separators=(",", ":"))


# --------------------------------------------------------------------------- digests

_digest_lock = threading.Lock()
_digest_locks: dict[str, threading.Lock] = {}
_digests: dict[tuple[str, int, int], tuple[str, str]] = {}


def file_digests(path: str) -> tuple[str, str]:
    """SHA1 and SHA-256 of a cached WPK, computed once per file version (many transfers of
    the same WPK share the result)."""
    with _digest_lock:
        lock = _digest_locks.setdefault(path, threading.Lock())
    with lock:
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)
        cached = _digests.get(key)
        if cached is not None:
            return cached
        sha1, sha256 = hashlib.sha1(), hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                sha1.update(block)
                sha256.update(block)
        result = (sha1.hexdigest(), sha256.hexdigest())
        with _digest_lock:
            if len(_digests) > 256:
                _digests.clear()
            _digests[key] = result
        return result


# --------------------------------------------------------------------------- pusher


class WpkPusher:
    """Runs the command sequence over one ``AgentLink`` (replaced by ``reconnect`` when the
    windowed transfer resumes on a new connection)."""

    def __init__(
        self,
        link: AgentLink,
        agent_version: str | None,
        settings: TransferSettings,
        progress: Progress | None = None,
        before_install: Callable[[], Awaitable[bool]] | None = None,
        reconnect: Reconnect | None = None,
        task_id: int | None = None,
        budget: ChunkBudget | None = None,
    ) -> None:
        self.link = link
        self.budget = budget
        self.json = uses_json(agent_version)
        self.settings = settings
        self.progress = progress
        self.before_install = before_install
        self.reconnect = reconnect
        self.stats = TransferStats()
        self.where = f"task {task_id} " if task_id is not None else ""

    @property
    def windowed(self) -> bool:
        """True when this push uses the windowed, resumable exchange."""
        return (
            self.json
            and self.settings.mode == "windowed"
            and WINDOW_FEATURES <= link_features(self.link)
        )

    def _report(self, sent: int, total: int) -> None:
        if self.progress:
            self.progress(sent, total)

    async def _send(
        self,
        target: str,
        payload: str,
        code: UpgradeCode,
        timeout: float | None = None,
        data: bytes | None = None,
    ) -> Reply:
        """One command; with ``data``, ``payload``'s empty buffer stands for it (a chunk)."""
        wait = timeout or self.settings.command_timeout
        pending = (
            self.link.request(target, payload, wait)
            if data is None
            else self.link.request_data(target, payload, data, wait)
        )
        del payload, data  # the transport drops the chunk once written; so do we
        try:
            text = await pending
        except TimeoutError as exc:
            raise UpgradeError(code, "no answer from the agent in time") from exc
        except (ConnectionError, OSError) as exc:
            raise LinkLost(code, f"agent connection lost: {exc}") from exc
        return parse_json_reply(text) if target == "upgrade" else parse_legacy_reply(text)

    async def _command(
        self,
        code: UpgradeCode,
        json_cmd: str,
        legacy: str,
        timeout: float | None = None,
        **params: Any,
    ) -> Reply:
        if self.json:
            return await self._send("upgrade", _json_command(json_cmd, **params), code, timeout)
        return await self._send("com", legacy, code, timeout)

    async def push(self, wpk: WpkRef) -> str:
        """Deliver and install ``wpk``; returns the installer's exit status text ("0"), or
        ``UNKNOWN`` when the agent was lost while its installer may have been running."""
        started = time.monotonic()
        if self.windowed:
            await self._deliver_windowed(wpk)
        else:
            await self._deliver_reference(wpk)
        stats = self.stats
        stats.seconds = time.monotonic() - started
        log.info(
            "%sagent %03d: %s transfer of %s done: %d bytes, %d bytes sent, resumed at %s, "
            "%d reconnections, %.2f s (writes %.2f s)",
            self.where,
            self.link.agent_id,
            stats.mode,
            wpk.file_name,
            stats.total,
            stats.bytes_sent,
            stats.resumed_at or "-",
            stats.reconnects,
            stats.seconds,
            stats.data_seconds,
        )
        return await self._install(wpk)

    async def _lock_restart(self) -> None:
        lock = await self._send("com", "lock_restart -1", UpgradeCode.SEND_LOCK_RESTART_ERROR)
        if not lock.ok:
            raise UpgradeError(UpgradeCode.SEND_LOCK_RESTART_ERROR, f"agent said: {lock.data}")

    # ------------------------------------------------------------------ reference exchange

    async def _deliver_reference(self, wpk: WpkRef) -> None:
        name = wpk.file_name
        self.stats.mode = "reference"
        await self._lock_restart()
        last = ""
        for attempt in range(1, self.settings.open_attempts + 1):
            reply = await self._command(
                UpgradeCode.SEND_OPEN_ERROR, "open", f"open wb {name}", mode="wb", file=name
            )
            if reply.ok:
                break
            last = reply.data
            log.debug("open attempt %d of %s failed: %s", attempt, name, last)
            # The reference retries back to back; an agent that just restarted refuses
            # commands until its start-up result check is over, so we wait a little.
            if attempt < self.settings.open_attempts:
                await asyncio.sleep(self.settings.open_retry_delay)
        else:
            raise UpgradeError(
                UpgradeCode.SEND_OPEN_ERROR,
                f"{self.settings.open_attempts} attempts, last answer: {last}",
            )

        sent = 0
        with open(wpk.path, "rb") as fh:
            total = os.fstat(fh.fileno()).st_size
            self.stats.total = total
            started = time.monotonic()
            while chunk := fh.read(self.settings.chunk_size):
                if self.json:
                    reply = await self._send(
                        "upgrade",
                        _json_command("write", buffer="", length=len(chunk), file=name),
                        UpgradeCode.SEND_WRITE_ERROR,
                        data=chunk,
                    )
                else:
                    reply = await self._send(
                        "com",
                        f"write {len(chunk)} {name} " + chunk.decode("latin-1"),
                        UpgradeCode.SEND_WRITE_ERROR,
                    )
                self.stats.bytes_sent += len(chunk)
                if not reply.ok:
                    raise UpgradeError(
                        UpgradeCode.SEND_WRITE_ERROR, f"at byte {sent}: agent said: {reply.data}"
                    )
                sent += len(chunk)
                self._report(sent, total)
            self.stats.data_seconds += time.monotonic() - started

        reply = await self._command(
            UpgradeCode.SEND_CLOSE_ERROR, "close", f"close {name}", file=name
        )
        if not reply.ok:
            raise UpgradeError(UpgradeCode.SEND_CLOSE_ERROR, f"agent said: {reply.data}")

        reply = await self._command(UpgradeCode.SEND_SHA1_ERROR, "sha1", f"sha1 {name}", file=name)
        if not reply.ok:
            raise UpgradeError(UpgradeCode.SEND_SHA1_ERROR, f"agent said: {reply.data}")
        if reply.data.strip().lower() != wpk.sha1.strip().lower():
            raise UpgradeError(
                UpgradeCode.SEND_SHA1_ERROR,
                f"The SHA1 of the file doesn't match in the agent: expected {wpk.sha1}, "
                f"agent has {reply.data}",
            )

    # ------------------------------------------------------------------ windowed exchange

    async def _deliver_windowed(self, wpk: WpkRef) -> None:
        self.stats.mode = "windowed"
        sha1, sha256 = await asyncio.to_thread(file_digests, wpk.path)
        expected_sha1 = (wpk.sha1 or sha1).strip().lower()
        expected_sha256 = (wpk.sha256 or sha256).strip().lower()
        failures = 0
        restarted = False
        while True:
            try:
                await self._windowed_once(
                    wpk, expected_sha1, expected_sha256, patient=failures > 0, afresh=restarted
                )
                return
            except _NoResume:
                log.info(
                    "%sagent %03d refused a resumable open; using the reference exchange",
                    self.where,
                    self.link.agent_id,
                )
                await self._deliver_reference(wpk)
                return
            except _Restart as exc:
                if restarted:
                    raise UpgradeError(UpgradeCode.SEND_SHA1_ERROR, str(exc)) from None
                restarted = True
                log.warning(
                    "%sagent %03d: %s after a resumed transfer; sending the whole file again",
                    self.where,
                    self.link.agent_id,
                    exc,
                )
            except LinkLost as exc:
                failures += 1
                if self.reconnect is None or failures > self.settings.resume_attempts:
                    raise
                agent_id = self.link.agent_id
                log.info(
                    "%sagent %03d: %s; waiting up to %.0f s for it to come back to resume",
                    self.where,
                    agent_id,
                    exc.detail,
                    self.settings.resume_timeout,
                )
                link = await self.reconnect(self.link)
                if link is None:
                    raise UpgradeError(
                        exc.code,
                        f"{exc.detail}; the agent did not come back within "
                        f"{self.settings.resume_timeout:g} s",
                    ) from exc
                self.link = link
                self.stats.reconnects += 1
                if not self.windowed:
                    await self._deliver_reference(wpk)
                    return

    async def _discard(self, name: str) -> None:
        """Truncate the agent's copy (and forget its progress): ``open`` in ``wb`` mode."""
        reply = await self._command(
            UpgradeCode.SEND_OPEN_ERROR, "open", f"open wb {name}", mode="wb", file=name
        )
        if not reply.ok:
            raise UpgradeError(UpgradeCode.SEND_OPEN_ERROR, f"agent said: {reply.data}")

    async def _open_resume(
        self, name: str, total: int, sha1: str, sha256: str, patient: bool
    ) -> int:
        """``open`` in resume mode, retried; returns the offset the agent holds.

        "Not ready" answers (an agent that has just started runs its start-up result check
        first, refusing upgrades meanwhile) are retried for ``not_ready_wait`` seconds, or
        ``resume_timeout`` when ``patient`` (a resume after a lost connection); other refusals
        count against ``open_attempts``."""
        wait = self.settings.resume_timeout if patient else self.settings.not_ready_wait
        deadline = time.monotonic() + wait
        attempts = 0
        payload = _json_command(
            "open", mode="resume", file=name, size=total, sha1=sha1, sha256=sha256
        )
        while True:
            reply = await self._send("upgrade", payload, UpgradeCode.SEND_OPEN_ERROR)
            if reply.ok:
                text = reply.data.strip()
                if not text.isdigit() or int(text) > total:
                    raise UpgradeError(
                        UpgradeCode.SEND_OPEN_ERROR, f"unexpected resume answer {reply.data!r}"
                    )
                return int(text)
            if reply.code == UNSUPPORTED_MODE:
                raise _NoResume()
            waiting = reply.code == NOT_READY and time.monotonic() < deadline
            if not waiting:
                attempts += 1
                if attempts >= self.settings.open_attempts:
                    raise UpgradeError(
                        UpgradeCode.SEND_OPEN_ERROR,
                        f"{self.settings.open_attempts} attempts, last answer: {reply.data}",
                    )
            log.debug("open (resume) of %s refused: %s", name, reply.data)
            await asyncio.sleep(max(self.settings.open_retry_delay, 0.05 if waiting else 0))

    async def _windowed_once(
        self, wpk: WpkRef, sha1: str, sha256: str, *, patient: bool, afresh: bool
    ) -> None:
        name = wpk.file_name
        fd = os.open(wpk.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            total = os.fstat(fd).st_size
            self.stats.total = total
            await self._lock_restart()
            if afresh:
                await self._discard(name)
            offset = await self._open_resume(name, total, sha1, sha256, patient)
            self.stats.resumed_at.append(offset)
            if offset:
                log.info(
                    "%sagent %03d holds %d of %d bytes of %s; sending the rest",
                    self.where,
                    self.link.agent_id,
                    offset,
                    total,
                    name,
                )
            self._report(offset, total)
            await self._stream(fd, name, offset, total)
        finally:
            os.close(fd)
        reply = await self._command(
            UpgradeCode.SEND_CLOSE_ERROR, "close", f"close {name}", file=name
        )
        if not reply.ok:
            raise UpgradeError(UpgradeCode.SEND_CLOSE_ERROR, f"agent said: {reply.data}")
        resumed = self.stats.resumed_at[-1] > 0
        for algorithm, expected in (("sha1", sha1), ("sha256", sha256)):
            reply = await self._send(
                "upgrade", _json_command(algorithm, file=name), UpgradeCode.SEND_SHA1_ERROR
            )
            if not reply.ok:
                raise UpgradeError(UpgradeCode.SEND_SHA1_ERROR, f"agent said: {reply.data}")
            if reply.data.strip().lower() != expected:
                text = (
                    f"The {algorithm.upper()} of the file doesn't match in the agent: expected "
                    f"{expected}, agent has {reply.data}"
                )
                if resumed:
                    raise _Restart(text)
                raise UpgradeError(UpgradeCode.SEND_SHA1_ERROR, text)

    async def _stream(self, fd: int, name: str, start: int, total: int) -> None:
        """Send bytes ``start..total`` with up to ``window`` writes awaiting their answer."""
        window = max(1, self.settings.window)
        chunk_size = self.settings.chunk_size
        inflight: dict[asyncio.Task[Reply], tuple[int, int]] = {}
        done_chunks: dict[int, int] = {}
        acked = start
        next_offset = start
        started = time.monotonic()
        try:
            while next_offset < total or inflight:
                while next_offset < total and len(inflight) < window:
                    size = min(chunk_size, total - next_offset)
                    budget = self.budget
                    # over the shared budget: wait for one of our answers (one chunk always
                    # goes, so no push waits on the others forever)
                    if budget is not None and not budget.take(size, force=not inflight):
                        break
                    data = b""
                    try:
                        data = os.pread(fd, size, next_offset)
                    finally:
                        if not data and budget is not None:
                            budget.give(size)
                    if not data:
                        raise UpgradeError(
                            UpgradeCode.SEND_WRITE_ERROR, f"the WPK ends at byte {next_offset}"
                        )
                    payload = _json_command(
                        "write", buffer="", length=len(data), file=name, offset=next_offset
                    )
                    task = asyncio.ensure_future(
                        self._send("upgrade", payload, UpgradeCode.SEND_WRITE_ERROR, data=data)
                    )
                    if budget is not None:
                        task.add_done_callback(lambda _, n=size, b=budget: b.give(n))
                    inflight[task] = (next_offset, len(data))
                    self.stats.bytes_sent += len(data)
                    next_offset += len(data)
                finished, _ = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                lost: LinkLost | None = None
                failure: BaseException | None = None
                for task in finished:
                    at, size = inflight.pop(task)
                    exc = task.exception()
                    if isinstance(exc, LinkLost):
                        lost = lost or exc
                    elif exc is not None:
                        failure = failure or exc
                    elif not task.result().ok:
                        failure = failure or UpgradeError(
                            UpgradeCode.SEND_WRITE_ERROR,
                            f"at byte {at}: agent said: {task.result().data}",
                        )
                    else:
                        done_chunks[at] = size
                if failure is not None:
                    raise failure
                if lost is not None:
                    raise lost
                before = acked
                while acked in done_chunks:
                    acked += done_chunks.pop(acked)
                if acked != before:
                    self._report(acked, total)
        finally:
            self.stats.data_seconds += time.monotonic() - started
            for task in inflight:
                task.cancel()
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)

    # ------------------------------------------------------------------ install

    async def _install(self, wpk: WpkRef) -> str:
        name = wpk.file_name
        if self.before_install is not None and not await self.before_install():
            raise UpgradeError(UpgradeCode.SEND_UPGRADE_ERROR, "task cancelled before install")

        # Wait longer than the agent's installer timeout (reference §11.12 fixed).
        timeout = self.settings.installer_timeout + self.settings.command_timeout
        losses = 0
        while True:
            try:
                reply = await self._command(
                    UpgradeCode.SEND_UPGRADE_ERROR,
                    "upgrade",
                    f"upgrade {name} {wpk.installer}",
                    timeout=timeout,
                    file=name,
                    installer=wpk.installer,
                )
                break
            except LinkLost as exc:
                losses += 1
                if not await self._upgrade_again(wpk, exc, losses):
                    return UNKNOWN
        if not reply.ok:
            raise UpgradeError(UpgradeCode.SEND_UPGRADE_ERROR, f"agent said: {reply.data}")
        status = reply.data.strip().split(" ", 1)[0] if reply.data.strip() else ""
        if status != "0":
            raise UpgradeError(
                UpgradeCode.SEND_UPGRADE_ERROR,
                f"Script execution failed in the agent: installer exit status {reply.data!r}",
            )
        return status

    async def _upgrade_again(self, wpk: WpkRef, lost: LinkLost, losses: int) -> bool:
        """The connection died during ``upgrade`` (the agent was killed or restarted).

        Once the agent is back, its copy of the WPK tells what happened: still in
        ``var/incoming`` with the expected SHA1 (the agent deletes it only after unpacking,
        just before its installer runs), the installer did not run: True, send ``upgrade``
        again. Gone, the installer may have run (and restarted the agent, which reports its
        result): False, the task waits for that report or its timeout. Before this, such a
        task was marked Error at once, even when its installer went on and succeeded
        (hardening R3).
        """
        if self.reconnect is None or losses > self.settings.resume_attempts:
            raise lost
        name = wpk.file_name
        log.info(
            "%sagent %03d: %s during upgrade; waiting up to %.0f s for it to come back",
            self.where,
            self.link.agent_id,
            lost.detail,
            self.settings.resume_timeout,
        )
        link = await self.reconnect(self.link)
        if link is None:
            raise UpgradeError(
                lost.code,
                f"{lost.detail}; the agent did not come back within "
                f"{self.settings.resume_timeout:g} s",
            ) from lost
        self.link = link
        self.stats.reconnects += 1
        deadline = time.monotonic() + self.settings.resume_timeout
        while True:
            reply = await self._command(
                UpgradeCode.SEND_UPGRADE_ERROR, "sha1", f"sha1 {name}", file=name
            )
            if reply.ok and reply.data.strip().lower() == wpk.sha1.strip().lower():
                log.info(
                    "%sagent %03d still holds %s: its installer did not run; upgrading again",
                    self.where,
                    self.link.agent_id,
                    name,
                )
                await self._lock_restart()
                return True
            if reply.code == NOT_READY and time.monotonic() < deadline:
                await asyncio.sleep(max(self.settings.open_retry_delay, 0.05))
                continue
            log.info(
                "%sagent %03d no longer holds %s (%s): its installer may have run; waiting "
                "for its report",
                self.where,
                self.link.agent_id,
                name,
                reply.data,
            )
            return False
