"""The agent's command handler: the reference command set, with its exact codes and replies.

``CommandHandler.handle(target, payload)`` is what the transport (and the local socket) call.

Target ``upgrade`` (agents >= 4.1, reference §2.6, §3.3, §7.2): ``payload`` is JSON
``{"command":..,"parameters":{..}}``; the reply is ``{"error":<code>,"message":<text>,"data":[]}``
in compact JSON. Commands: ``open``, ``write``, ``close``, ``sha1``, ``upgrade``,
``clear_upgrade_result``, and our extension ``sha256`` (same rules as ``sha1``; failure text
"Cannot generate SHA256"). Choices where the reference is silent or crashes:

* payload that is not JSON, not an object, or without a string ``command`` -> 2 (Command not
  found), like an unknown command; ``parameters`` missing or not an object -> 3;
* a missing or mistyped parameter (``write`` without ``buffer``/``length``, which crashes the
  reference, §11.13) -> 3;
* ``write``: ``buffer`` that is not base64, or decodes to other than ``length`` bytes -> 10;
* while upgrades are not allowed every command but ``clear_upgrade_result`` -> 1; when the
  module is disabled (``upgrade.enabled = false``) ``clear_upgrade_result`` is refused with 1
  too, so that it cannot open the gate;
* file names are jailed in ``var/incoming``: empty, ``.``, anything containing ``..``, ``/``,
  ``\\`` or NUL -> 5;
* ``open`` does not follow a symlink at ``var/incoming/<file>`` (6, "Too many levels of
  symbolic links");
* after a successful verification and unpacking the received WPK is deleted from
  ``var/incoming`` (what the reference meant to do, §11.14).

Extensions for the manager's windowed, resumable transfer (announced as ``features``; the
reference sequence is unchanged):

* ``write`` may carry ``offset`` (an integer >= 0): the chunk is written there (``pwrite``)
  instead of at the current position, so chunks may arrive out of order;
* ``open`` with ``"mode":"resume"`` and the file's announced ``size`` (plus ``sha1`` and/or
  ``sha256``) opens without truncating when ``var/incoming/<file>.progress`` records a
  transfer of the very same file, and answers the number of bytes already held (the
  contiguous prefix written) as its ``message``; otherwise it starts the file afresh and
  answers ``0``. While such a file is open the contiguous prefix is tracked and persisted in
  that progress file (at least every 1 MiB or half second, and at ``close``), so it survives an
  agent restart; writes past the announced size answer 10. ``open`` in ``w``/``wb`` mode and a
  successful ``upgrade`` delete the progress file.

Target ``com`` (reference §3.4, §7.3): ``lock_restart <n>`` always, and the legacy
``open``/``write``/``close``/``sha1``/``upgrade``/``upgrade_result`` of pre-4.1 agents with the
legacy reply texts (``ok ...`` / ``err ...``). Legacy file and upgrade commands obey the same
gate as the JSON ones. Legacy ``write`` data is raw bytes: the payload text is turned back into
bytes with latin-1 (the manager carries each byte as one character, see ``transfer.py``).

Long steps (hashing, verification and unpacking, the installer) never block the event loop.
Every refusal is logged with its precise reason.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AgentCode, AgentCommandError, WpkError, agent_message
from ..untrusted import clip, clip_text, loads
from ..wpk import verify_and_unpack
from .config import AgentConfig
from .installer import InstallerResult, run_installer
from .result import UpgradeGate

log = logging.getLogger(__name__)

FILE_MODES = ("w", "wb")
CA_DISABLED_WARNING = "WPK verification with CA is disabled"
DEFAULT_INSTALLER = "upgrade.bat" if sys.platform == "win32" else "upgrade.sh"
_HASH_BLOCK = 1 << 20
RESUME_MODE = "resume"
PROGRESS_SUFFIX = ".progress"
#: The progress file is rewritten when the prefix grew this much, or this long after the last.
PROGRESS_BYTES = 1 << 20
PROGRESS_SECONDS = 0.5


def reply(code: AgentCode | int, message: str | None = None) -> str:
    """A JSON command reply, compact, with the reference text unless ``message`` is given."""
    text = agent_message(code) if message is None else message
    return json.dumps({"error": int(code), "message": text, "data": []}, separators=(",", ":"))


class RestartLock:
    """The ``lock_restart`` state (reference execd): restarts wait while it is held.

    ``lock(seconds)`` holds it until then; ``release()`` ends it early (an installer ran).
    """

    def __init__(self) -> None:
        self._until = 0.0
        self._released = asyncio.Event()
        self._released.set()

    def lock(self, seconds: float) -> None:
        self._until = time.monotonic() + seconds
        if seconds > 0:
            self._released.clear()
        else:
            self._released.set()

    def release(self) -> None:
        self._until = 0.0
        self._released.set()

    def remaining(self) -> float:
        """Seconds the lock is still held (0 when free)."""
        if self._released.is_set():
            return 0.0
        return max(0.0, self._until - time.monotonic())

    async def wait_released(self) -> None:
        """Return once the lock is released or has expired (re-locking extends the wait)."""
        while (left := self.remaining()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), left)


@dataclass
class _Progress:
    """What a resumable transfer holds: the file's identity and its contiguous prefix."""

    path: Path
    name: str
    size: int
    sha1: str | None
    sha256: str | None
    contiguous: int = 0
    beyond: dict[int, int] = field(default_factory=dict)
    saved: int = -1
    saved_at: float = 0.0

    def same_file(self, other: dict[str, Any]) -> bool:
        return (
            other.get("file") == self.name
            and other.get("size") == self.size
            and other.get("sha1") == self.sha1
            and other.get("sha256") == self.sha256
        )

    def add(self, start: int, end: int) -> None:
        """Record bytes ``start..end`` as written; grow the contiguous prefix."""
        if start > self.contiguous:
            self.beyond[start] = max(self.beyond.get(start, start), end)
            return
        self.contiguous = max(self.contiguous, end)
        merged = True
        while merged and self.beyond:
            merged = False
            for first in [b for b in self.beyond if b <= self.contiguous]:
                self.contiguous = max(self.contiguous, self.beyond.pop(first))
                merged = True

    def save(self, force: bool = False) -> None:
        """Rewrite the progress file (atomically) when due, or always with ``force``."""
        now = time.monotonic()
        if self.contiguous == self.saved and not force:
            return
        due = (
            self.contiguous - self.saved >= PROGRESS_BYTES
            or now - self.saved_at >= PROGRESS_SECONDS
            or self.contiguous >= self.size
        )
        if not (force or due):
            return
        record = {
            "file": self.name,
            "size": self.size,
            "sha1": self.sha1,
            "sha256": self.sha256,
            "contiguous": self.contiguous,
        }
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.path)
        self.saved, self.saved_at = self.contiguous, now


def _read_progress(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("contiguous"), int):
        return None
    return record


@dataclass
class _OpenFile:
    name: str
    path: Path
    fd: int
    position: int = 0
    progress: _Progress | None = None


def _required(params: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = params.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise AgentCommandError(
            AgentCode.REQUIRED_PARAMETERS, f"parameter {key!r} is missing or has the wrong type"
        )
    return value


def _hash_file(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


#: AgentCode -> legacy execd reply text (reference §3.4), used for the ``com`` target.
_LEGACY_TEXT: dict[AgentCode, str] = {
    AgentCode.DISABLED: "Upgrade module is disabled or not ready yet",
    AgentCode.UNSUPPORTED_MODE: "Unsupported mode",
    AgentCode.INVALID_FILE_NAME: "Invalid file name",
    AgentCode.FILE_NOT_OPENED: (
        "File not opened. Agent might have been auto-restarted during upgrade"
    ),
    AgentCode.NO_FILE_OPENED: "No file opened",
    AgentCode.TARGET_FILE_MISMATCH: "The target file doesn't match the opened file",
    AgentCode.CANNOT_WRITE: "Cannot write",
    AgentCode.CANNOT_CLOSE: "Cannot close",
    AgentCode.CANNOT_SHA1: "Cannot generate SHA1",
    AgentCode.SIGNATURE: "Could not verify signature",
    AgentCode.UNCOMPRESS: "Could not uncompress package",
    AgentCode.CLEAN_UPGRADE_DIR: "Cannot clean up directory",
    AgentCode.UNMERGE: "Cannot unmerge file",
    AgentCode.CHMOD: "Could not chmod",
    AgentCode.EXECUTE: "Cannot execute installer",
}


class _LegacyReply(Exception):
    """Internal: a ready legacy ``err ...`` text."""


class CommandHandler:
    """Answers manager commands for one agent process (state lives in memory only).

    ``gate`` is the shared ``allow_upgrades`` flag (the reporter opens it); ``restart_lock`` is
    the ``lock_restart`` state the daemon honours on SIGHUP.
    """

    #: Protocol extensions, announced by the transport in the agent's hello.
    features = ("offset", "resume", "sha256")

    def __init__(
        self,
        config: AgentConfig,
        gate: UpgradeGate | None = None,
        restart_lock: RestartLock | None = None,
    ) -> None:
        self.config = config
        self.gate = gate if gate is not None else UpgradeGate()
        self.restart_lock = restart_lock if restart_lock is not None else RestartLock()
        self.log = logging.LoggerAdapter(log, {"agent_id": config.agent.id})
        self._open: _OpenFile | None = None
        self._upgrade_lock = asyncio.Lock()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._json: dict[str, Callable[[dict[str, Any]], Awaitable[str]]] = {
            "open": self._json_open,
            "write": self._json_write,
            "close": self._json_close,
            "sha1": self._json_sha1,
            "sha256": self._json_sha256,
            "upgrade": self._json_upgrade,
            "clear_upgrade_result": self._json_clear,
        }

    # ------------------------------------------------------------------ entry points

    async def handle(self, target: str, payload: str) -> str:
        """Transport-facing entry point: ``upgrade`` (JSON) or ``com`` (legacy text)."""
        self._inflight += 1
        self._idle.clear()
        try:
            if target == "upgrade":
                return await self.handle_json(payload)
            if target == "com":
                return await self.handle_legacy(payload)
            self.log.warning("refused a request for unknown target %s", clip(target))
            return "err Unrecognized command"
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    async def wait_idle(self) -> None:
        """Return when no command is being handled."""
        await self._idle.wait()

    def close_all(self) -> None:
        """Forget (and close) the file open for writing, if any (agent stop)."""
        self._drop_open()

    @property
    def open_file(self) -> str | None:
        """Name of the file currently open for writing, if any."""
        return self._open.name if self._open else None

    async def handle_json(self, payload: str) -> str:
        """One JSON command (reference §7.2) -> its JSON reply text."""
        try:
            request = loads(payload, nul=True)
        except ValueError as exc:
            return self._refuse(None, AgentCommandError(AgentCode.COMMAND_NOT_FOUND, str(exc)))
        command = request.get("command") if isinstance(request, dict) else None
        if not isinstance(command, str):
            return self._refuse(
                None,
                AgentCommandError(AgentCode.COMMAND_NOT_FOUND, "no string 'command' in request"),
            )
        params = request.get("parameters")
        if not isinstance(params, dict):
            return self._refuse(
                command,
                AgentCommandError(AgentCode.REQUIRED_PARAMETERS, "no 'parameters' object"),
            )
        if command != "clear_upgrade_result" and not self.gate.allowed:
            return self._refuse(command, self._disabled_error())
        func = self._json.get(command)
        if func is None:
            return self._refuse(
                command, AgentCommandError(AgentCode.COMMAND_NOT_FOUND, "unknown command")
            )
        try:
            return reply(AgentCode.OK, await func(params))
        except AgentCommandError as exc:
            return self._refuse(command, exc)
        except Exception:
            self.log.exception("command %s failed unexpectedly", clip(command))
            return reply(AgentCode.EXECUTE)

    def _refuse(self, command: str | None, exc: AgentCommandError) -> str:
        # "not ready" during the start-up result check is routine (the manager retries once
        # a second for up to a minute): info, not a warning per retry
        level = logging.INFO if exc.code == AgentCode.DISABLED else logging.WARNING
        self.log.log(
            level,
            "refused command %s: %s (%d)%s",
            clip(command),
            exc.text,
            exc.code,
            f": {clip_text(exc.detail)}" if exc.detail else "",
        )
        return reply(exc.code, exc.text)

    def _disabled_error(self) -> AgentCommandError:
        why = (
            "upgrades are disabled in the configuration"
            if not self.config.upgrade.enabled
            else "the start-up result check has not allowed upgrades yet"
        )
        return AgentCommandError(AgentCode.DISABLED, why)

    # ------------------------------------------------------------------ JSON commands

    async def _json_open(self, params: dict[str, Any]) -> str:
        mode = _required(params, "mode", str)
        name = _required(params, "file", str)
        if mode == RESUME_MODE:
            size = _required(params, "size", int)
            digests = {}
            for key in ("sha1", "sha256"):
                value = params.get(key)
                if value is not None and not isinstance(value, str):
                    raise AgentCommandError(AgentCode.REQUIRED_PARAMETERS, f"{key!r} not text")
                digests[key] = value.lower() if value else None
            if size < 0 or not any(digests.values()):
                raise AgentCommandError(
                    AgentCode.REQUIRED_PARAMETERS, "resume needs a size and sha1 or sha256"
                )
            return str(self.open_resume(name, size, digests["sha1"], digests["sha256"]))
        self.open_for_write(mode, name)
        return agent_message(AgentCode.OK)

    async def _json_write(self, params: dict[str, Any]) -> str:
        name = _required(params, "file", str)
        buffer = _required(params, "buffer", str)
        length = _required(params, "length", int)
        if length < 0:
            raise AgentCommandError(AgentCode.REQUIRED_PARAMETERS, "'length' is negative")
        offset = params.get("offset")
        if offset is not None and (
            isinstance(offset, bool) or not isinstance(offset, int) or offset < 0
        ):
            raise AgentCommandError(AgentCode.REQUIRED_PARAMETERS, "'offset' is not an integer")
        # name and open-file checks first, so that 5/7/9 take precedence over 10
        self._incoming(name)
        self._check_open(name, for_write=True)
        try:
            data = base64.b64decode(buffer, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise AgentCommandError(AgentCode.CANNOT_WRITE, f"buffer is not base64: {exc}") from exc
        self.write(name, data, length, offset)
        return agent_message(AgentCode.OK)

    async def _json_close(self, params: dict[str, Any]) -> str:
        self.close(_required(params, "file", str))
        return agent_message(AgentCode.OK)

    async def _json_sha1(self, params: dict[str, Any]) -> str:
        return await self.digest(_required(params, "file", str), "sha1")

    async def _json_sha256(self, params: dict[str, Any]) -> str:
        return await self.digest(_required(params, "file", str), "sha256")

    async def _json_upgrade(self, params: dict[str, Any]) -> str:
        name = _required(params, "file", str)
        installer = params.get("installer", DEFAULT_INSTALLER)
        if not isinstance(installer, str):
            raise AgentCommandError(AgentCode.REQUIRED_PARAMETERS, "'installer' is not a string")
        result = await self.upgrade(name, installer)
        return str(result.status)

    async def _json_clear(self, params: dict[str, Any]) -> str:
        if not self.config.upgrade.enabled:
            raise self._disabled_error()
        self.clear_upgrade_result()
        return agent_message(AgentCode.OK)

    # ------------------------------------------------------------------ operations

    def _incoming(self, name: str) -> Path:
        """``var/incoming/<name>``; ``AgentCommandError(5)`` when the name leaves the jail."""
        if (
            not name
            or name == "."
            or ".." in name
            or "/" in name
            or "\\" in name
            or "\0" in name
            or os.path.isabs(name)
        ):
            raise AgentCommandError(
                AgentCode.INVALID_FILE_NAME, f"file name {name!r} would leave var/incoming"
            )
        return self.config.incoming_dir / name

    def _check_open(self, name: str, *, for_write: bool) -> _OpenFile:
        if self._open is None:
            if for_write:
                raise AgentCommandError(
                    AgentCode.FILE_NOT_OPENED, f"write to {name!r} but no file is open"
                )
            raise AgentCommandError(AgentCode.NO_FILE_OPENED, f"close {name!r}: no file is open")
        if self._open.name != name:
            raise AgentCommandError(
                AgentCode.TARGET_FILE_MISMATCH,
                f"request names {name!r} but {self._open.name!r} is open",
            )
        return self._open

    def _drop_open(self) -> None:
        current, self._open = self._open, None
        if current is not None:
            if current.progress is not None:
                with contextlib.suppress(OSError):
                    current.progress.save(force=True)
            with contextlib.suppress(OSError):
                os.close(current.fd)

    def open_for_write(self, mode: str, name: str) -> None:
        """``open``: close any open file (with a warning), then create ``var/incoming/<name>``."""
        if self._open is not None:
            self.log.warning("At open: File '%s' was opened. Closing.", self._open.path)
            self._drop_open()
        if mode not in FILE_MODES:
            raise AgentCommandError(AgentCode.UNSUPPORTED_MODE, f"mode {mode!r}")
        path = self._incoming(name)
        fd = self._open_fd(path, truncate=True)
        self._open = _OpenFile(name, path, fd)
        with contextlib.suppress(OSError):
            self._progress_path(path).unlink()
        self.log.debug("opened %s for writing", path)

    @staticmethod
    def _progress_path(path: Path) -> Path:
        return path.with_name(path.name + PROGRESS_SUFFIX)

    @staticmethod
    def _open_fd(path: Path, truncate: bool) -> int:
        # never through a symlink planted in var/incoming
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else 0)
        flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
        try:
            return os.open(path, flags, 0o640)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise AgentCommandError(
                AgentCode.FILE_OPEN_ERROR,
                f"cannot open {path}: {reason}",
                text=agent_message(AgentCode.FILE_OPEN_ERROR) + reason,
            ) from exc

    def open_resume(self, name: str, size: int, sha1: str | None, sha256: str | None) -> int:
        """``open`` in ``resume`` mode: keep what an earlier transfer of the same file wrote
        (per its progress file) and return that many bytes; else start afresh and return 0."""
        if self._open is not None:
            self.log.warning("At open: File '%s' was opened. Closing.", self._open.path)
            self._drop_open()
        path = self._incoming(name)
        progress = _Progress(self._progress_path(path), name, size, sha1, sha256)
        record = _read_progress(progress.path)
        offset = 0
        fd = -1
        if record is not None and progress.same_file(record):
            fd = self._open_fd(path, truncate=False)
            try:
                held = os.fstat(fd).st_size
            except OSError:
                held = 0
            offset = max(0, min(record["contiguous"], held, size))
        if fd < 0:
            fd = self._open_fd(path, truncate=True)
        progress.contiguous = offset
        try:
            progress.save(force=True)
        except OSError as exc:
            os.close(fd)
            raise AgentCommandError(
                AgentCode.FILE_OPEN_ERROR,
                f"cannot record progress in {progress.path}: {exc.strerror or exc}",
                text=agent_message(AgentCode.FILE_OPEN_ERROR) + (exc.strerror or str(exc)),
            ) from exc
        self._open = _OpenFile(name, path, fd, position=offset, progress=progress)
        if offset:
            self.log.info("resuming %s at byte %d of %d", path, offset, size)
        else:
            self.log.debug("opened %s for a resumable transfer of %d bytes", path, size)
        return offset

    def write(self, name: str, data: bytes, length: int, offset: int | None = None) -> None:
        """``write``: exactly ``length`` bytes of ``data`` at ``offset`` (default: where the
        previous write ended, i.e. appended)."""
        self._incoming(name)
        current = self._check_open(name, for_write=True)
        if len(data) != length:
            raise AgentCommandError(
                AgentCode.CANNOT_WRITE,
                f"write to '{current.path}' refused: {len(data)} bytes received, "
                f"{length} announced",
            )
        start = current.position if offset is None else offset
        progress = current.progress
        if progress is not None and start + length > progress.size:
            raise AgentCommandError(
                AgentCode.CANNOT_WRITE,
                f"write to '{current.path}' refused: bytes {start}..{start + length} are past "
                f"the announced size {progress.size}",
            )
        view = memoryview(data)
        at = start
        try:
            while view:
                written = os.pwrite(current.fd, view, at)
                if written <= 0:
                    raise OSError(0, "no progress")
                view = view[written:]
                at += written
        except OSError as exc:
            raise AgentCommandError(
                AgentCode.CANNOT_WRITE,
                f"At write: Cannot write on '{current.path}': {exc.strerror or exc}",
            ) from exc
        current.position = at
        if progress is not None:
            progress.add(start, at)
            try:
                progress.save()
            except OSError as exc:
                self.log.warning("cannot record progress in %s: %s", progress.path, exc)

    def close(self, name: str) -> None:
        """``close``: flush to disk and close the open file."""
        self._incoming(name)
        current = self._check_open(name, for_write=False)
        self._open = None
        if current.progress is not None:
            with contextlib.suppress(OSError):
                current.progress.save(force=True)
        try:
            os.fsync(current.fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.close(current.fd)
            raise AgentCommandError(
                AgentCode.CANNOT_CLOSE, f"cannot flush {current.path}: {exc.strerror}"
            ) from exc
        try:
            os.close(current.fd)
        except OSError as exc:
            raise AgentCommandError(
                AgentCode.CANNOT_CLOSE, f"cannot close {current.path}: {exc.strerror}"
            ) from exc

    async def digest(self, name: str, algorithm: str) -> str:
        """``sha1``/``sha256``: lowercase hex digest of ``var/incoming/<name>``."""
        path = self._incoming(name)
        try:
            return await asyncio.to_thread(_hash_file, path, algorithm)
        except OSError as exc:
            raise AgentCommandError(
                AgentCode.CANNOT_SHA1,
                f"cannot hash {path}: {exc.strerror or exc}",
                text=None if algorithm == "sha1" else f"Cannot generate {algorithm.upper()}",
            ) from exc

    def clear_upgrade_result(self) -> None:
        """``clear_upgrade_result``: delete the result file and allow upgrades."""
        path = self.config.result_file
        try:
            path.unlink()
        except OSError as exc:
            raise AgentCommandError(
                AgentCode.ERASE_RESULT,
                f"At clear_upgrade_result: Could not erase file '{path}': {exc.strerror}",
            ) from exc
        self.gate.allow()
        self.log.info("upgrade result cleared; upgrades allowed")

    async def upgrade(self, name: str, installer: str) -> InstallerResult:
        """``upgrade``: verify and unpack ``var/incoming/<name>``, then run ``installer``.

        Raises ``WpkError``/``AgentCommandError`` with the code of the failed step (§6.3).
        """
        path = self._incoming(name)
        async with self._upgrade_lock:
            stores = self.config.ca_stores
            if stores is None:
                self.log.warning(
                    "%s: %s is trusted on its embedded certificate only", CA_DISABLED_WARNING, name
                )
            try:
                unpacked = await asyncio.to_thread(
                    verify_and_unpack, path, stores, self.config.upgrade_dir, installer
                )
            except OSError as exc:  # the WPK itself cannot be read (reference step 2)
                raise WpkError(
                    AgentCode.SIGNATURE, f"cannot read {path}: {exc.strerror or exc}"
                ) from exc
            with contextlib.suppress(OSError):
                path.unlink()
            with contextlib.suppress(OSError):
                self._progress_path(path).unlink()
            verified = unpacked.verified
            self.log.info(
                "WPK %s verified (sha1 %s, sha256 %s, CA verified: %s) and unpacked",
                name,
                verified.sha1,
                verified.sha256,
                verified.ca_verified,
            )
            target = unpacked.installer_path
            if sys.platform != "win32":
                try:
                    os.chmod(target, 0o750)
                except OSError as exc:
                    raise AgentCommandError(
                        AgentCode.CHMOD, f"chmod 0750 {target}: {exc.strerror}"
                    ) from exc
            env = {
                "WPK_AGENT_HOME": str(self.config.home),
                "WPK_AGENT_PID": str(os.getpid()),
            }
            if self.config.source_path:
                env["WPK_AGENT_CONFIG"] = self.config.source_path
            self.log.info(
                "running installer %s (timeout %g s)", target, self.config.upgrade.installer_timeout
            )
            try:
                result = await run_installer(
                    target,
                    cwd=self.config.upgrade_dir,
                    timeout=self.config.upgrade.installer_timeout,
                    env=env,
                )
            finally:
                self.restart_lock.release()
            self.log.info(
                "installer %s exited with status %d after %.1f s; output: %s",
                installer,
                result.status,
                result.seconds,
                result.output.strip()[-2000:] or "(none)",
            )
            return result

    # ------------------------------------------------------------------ legacy (com)

    async def handle_legacy(self, payload: str) -> str:
        """One legacy ``com`` command (reference §3.4, §7.3) -> ``ok ...`` / ``err ...``."""
        command, _, rest = payload.partition(" ")
        try:
            if command == "lock_restart":
                return self._legacy_lock_restart(rest)
            func = self._legacy.get(command)
            if func is None:
                raise _LegacyReply("Unrecognized command")
            if not self.gate.allowed:
                raise self._disabled_error()
            return await func(self, payload, rest)
        except _LegacyReply as exc:
            self.log.warning("refused legacy command %s: %s", clip(command), clip_text(str(exc)))
            return f"err {exc}"
        except AgentCommandError as exc:
            text = _LEGACY_TEXT.get(AgentCode(exc.code), exc.text)
            if exc.code == AgentCode.FILE_OPEN_ERROR:
                text = exc.text.removeprefix(agent_message(AgentCode.FILE_OPEN_ERROR))
            self.log.warning(
                "refused legacy command %s: %s (%s)", clip(command), text, clip_text(exc.detail)
            )
            return f"err {text}"
        except Exception as exc:
            self.log.exception("legacy command %s failed unexpectedly", clip(command))
            return f"err {exc}"

    @staticmethod
    def _args(command: str, rest: str, count: int) -> list[str]:
        args = rest.split(" ", count - 1) if rest else []
        if len(args) < count or not all(args):
            raise _LegacyReply(f"WCOM {command} needs arguments")
        return args

    def _legacy_lock_restart(self, rest: str) -> str:
        (arg,) = self._args("lock_restart", rest.strip(), 1)
        try:
            seconds = int(arg)
        except ValueError:
            raise _LegacyReply("Invalid timeout") from None
        if seconds < -1:
            raise _LegacyReply("Invalid timeout")
        limit = self.config.upgrade.max_restart_lock
        lock_for = limit if seconds == -1 or seconds > limit else float(seconds)
        self.restart_lock.lock(lock_for)
        self.log.info("restart locked for %g s", lock_for)
        return "ok "

    async def _legacy_open(self, payload: str, rest: str) -> str:
        mode, name = self._args("open", rest, 2)
        self.open_for_write(mode, name)
        return "ok "

    async def _legacy_write(self, payload: str, rest: str) -> str:
        parts = rest.split(" ", 2)
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise _LegacyReply("WCOM write needs arguments")
        size_text, name = parts[0], parts[1]
        try:
            size = int(size_text)
        except ValueError:
            raise _LegacyReply("WCOM write needs arguments") from None
        # The data is the last <size> bytes of the message (it may contain spaces); the
        # manager carries raw bytes as latin-1 text, one character per byte.
        if size < 0 or size > len(payload) - len(f"write {size_text} {name} "):
            raise _LegacyReply("Write file")
        try:
            data = payload[len(payload) - size :].encode("latin-1")
        except UnicodeEncodeError:
            raise _LegacyReply("Write file") from None
        self.write(name, data, size)
        return "ok "

    async def _legacy_close(self, payload: str, rest: str) -> str:
        (name,) = self._args("close", rest, 1)
        self.close(name)
        return "ok "

    async def _legacy_sha1(self, payload: str, rest: str) -> str:
        (name,) = self._args("sha1", rest, 1)
        return f"ok {await self.digest(name, 'sha1')}"

    async def _legacy_upgrade(self, payload: str, rest: str) -> str:
        name, installer = self._args("upgrade", rest, 2)
        self._incoming(name)
        try:
            result = await self.upgrade(name, installer)
        except WpkError as exc:
            if exc.code == AgentCode.INVALID_FILE_NAME:
                raise _LegacyReply("Invalid installer name") from exc
            raise
        return f"ok {result.status} {result.output}"

    async def _legacy_upgrade_result(self, payload: str, rest: str) -> str:
        try:
            return f"ok {self.config.result_file.read_text(errors='replace')}"
        except OSError:
            raise _LegacyReply("Cannot read upgrade_result file.") from None

    _legacy: dict[str, Callable[[CommandHandler, str, str], Awaitable[str]]] = {
        "open": _legacy_open,
        "write": _legacy_write,
        "close": _legacy_close,
        "sha1": _legacy_sha1,
        "upgrade": _legacy_upgrade,
        "upgrade_result": _legacy_upgrade_result,
    }
