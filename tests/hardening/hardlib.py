"""Shared pieces of the hardening measurements (``tests/hardening``).

* ``Figure``: what one measurement tried, how many attempts failed, the first failures.
* ``Size``: CI-sized (default) or full-sized counts.
* ``LogWatch``: counts log records while a measurement runs (log flooding, crashes: an
  ``Unhandled exception`` or ``Task exception was never retrieved`` from asyncio).
* Raw clients for the framed sockets (``exchange``), store snapshots (``task_snapshot``).
* A lab: CA, WPK signer, TLS certificates, signed WPKs whose installer leaves a marker.
* ``AgentProc`` and ``ManagerProc``: the real ``wpk-upgrade agent`` / ``manager`` processes.

Every measurement module exposes ``measure(size) -> list[Figure]``; the pytest modules run the
CI size and assert, ``report.py`` prints the figures.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wpk_upgrade import pki, wpk
from wpk_upgrade.framing import request_unix
from wpk_upgrade.interfaces import TaskFilter, TaskStore

HEADER = struct.Struct("<I")
ROOT = Path(__file__).resolve().parents[2]

#: One message may cause at most this many log lines / bytes (log flooding).
LOG_LINES_PER_MESSAGE = 50
LOG_BYTES_PER_MESSAGE = 16 * 1024


# --------------------------------------------------------------------------- figures


@dataclass
class Figure:
    """One measured figure: ``<key> <title>: tried N, failed M``."""

    key: str
    title: str
    tried: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def ok(self, count: int = 1) -> None:
        self.tried += count

    def fail(self, what: str) -> None:
        """Count one failed attempt (also tried) and keep its description (the first 30)."""
        self.tried += 1
        self.failed += 1
        if len(self.failures) < 30:
            self.failures.append(what)

    def check(self, good: bool, what: str) -> bool:
        if good:
            self.ok()
        else:
            self.fail(what)
        return good

    def line(self) -> str:
        return f"{self.key} {self.title}: tried {self.tried}, failed {self.failed}"

    def details(self) -> str:
        out = [self.line()]
        out += [f"    note: {n}" for n in self.notes]
        out += [f"    FAIL: {f}" for f in self.failures]
        return "\n".join(out)


@dataclass(frozen=True)
class Size:
    """CI-sized or full-sized runs."""

    full: bool = False

    def pick(self, ci: int, full: int) -> int:
        return full if self.full else ci


def assert_figures(figures: list[Figure]) -> None:
    """pytest helper: every figure tried something and failed nothing (then the scratch
    directories go; on a failure they stay, named in the log, for a look)."""
    text = "\n".join(f.details() for f in figures)
    assert all(f.tried > 0 for f in figures), text
    assert all(f.failed == 0 for f in figures), text
    remove_scratch()


# --------------------------------------------------------------------------- logs


class LogWatch(logging.Handler):
    """Counts records of the whole process (root logger, INFO and up) while installed.

    ``crashes`` collects the records that mean an exception escaped a connection handler or a
    task (asyncio's own error reports) or any record carrying a traceback.
    """

    CRASH_TEXTS = (
        "Unhandled exception",
        "Task exception was never retrieved",
        "Exception in callback",
        "Fatal error",
    )

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines = 0
        self.bytes = 0
        self.biggest = 0
        self.crashes: list[str] = []
        self.messages: list[str] = []  # every message, clipped to 300 characters
        self.lock_ = threading.Lock()
        self._old_level: int | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is still a record
            text = str(record.msg)
        with self.lock_:
            self.lines += 1
            self.bytes += len(text)
            self.messages.append(text[:300])
            self.biggest = max(self.biggest, len(text))
            if record.exc_info or any(t in text for t in self.CRASH_TEXTS):
                exc = record.exc_info[1] if record.exc_info else None
                self.crashes.append(f"{record.name}: {text[:200]} {exc!r}"[:400])

    def mark(self) -> tuple[int, int]:
        with self.lock_:
            return self.lines, self.bytes

    def since(self, mark: tuple[int, int]) -> tuple[int, int]:
        with self.lock_:
            return self.lines - mark[0], self.bytes - mark[1]

    def __enter__(self) -> LogWatch:
        root = logging.getLogger()
        self._old_level = root.level
        root.setLevel(logging.INFO)
        root.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        root = logging.getLogger()
        root.removeHandler(self)
        if self._old_level is not None:
            root.setLevel(self._old_level)


# --------------------------------------------------------------------------- raw clients


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


def exchange(
    path: Path | tuple[str, int],
    data: bytes,
    *,
    shutdown: bool = True,
    timeout: float = 15.0,
) -> bytes:
    """Send raw bytes, half-close, read until the server closes; ``TimeoutError`` if it hangs."""
    family = socket.AF_UNIX if isinstance(path, Path) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path) if isinstance(path, Path) else path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        if shutdown:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        chunks = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise TimeoutError("the server neither answered nor closed") from None
            if not chunk:
                break
            chunks.append(chunk)
            if time.monotonic() > deadline:
                raise TimeoutError("the server kept sending")
        return b"".join(chunks)


def parse_reply(data: bytes) -> Any:
    """The one JSON frame in ``data`` (``ValueError`` when it is not exactly one frame)."""
    if len(data) < 4:
        raise ValueError(f"no frame ({len(data)} bytes)")
    (size,) = HEADER.unpack(data[:4])
    if len(data) != 4 + size:
        raise ValueError(f"frame announces {size} bytes, {len(data) - 4} follow")
    return json.loads(data[4:])


def is_envelope(reply: Any) -> bool:
    """The manager sockets' reply shape ``{"error": int, "data": [...], "message": str}``."""
    return (
        isinstance(reply, dict)
        and isinstance(reply.get("error"), int)
        and isinstance(reply.get("data"), list)
        and isinstance(reply.get("message"), str)
    )


def accepted(reply: Any) -> bool:
    """True when the request may have changed something (not refused as a whole or per item)."""
    if not is_envelope(reply) or reply["error"] != 0:
        return False
    return any(isinstance(i, dict) and i.get("error") == 0 for i in reply["data"])


def send_json(path: Path, message: Any, timeout: float = 30.0) -> Any:
    return json.loads(request_unix(str(path), json.dumps(message).encode(), timeout))


# --------------------------------------------------------------------------- store


def task_snapshot(store: TaskStore) -> tuple[Any, ...]:
    """Every task (id, agent, node, status, times, error) and its history length."""
    tasks = store.list_tasks(TaskFilter(limit=100000))
    return tuple(
        (
            t.task_id,
            t.agent_id,
            t.node,
            t.status.value,
            t.update_time,
            t.error_msg,
            len(store.history(t.task_id)),
        )
        for t in sorted(tasks, key=lambda t: t.task_id)
    )


def tree_snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Every path under ``root`` (relative) with a digest of its content or link target."""
    state: dict[str, str] = {}
    if not root.exists():
        return state
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        dirnames[:] = [
            d for d in dirnames if not any(f"{rel_dir}/{d}".lstrip("./") == s for s in skip)
        ]
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if any(rel == s or rel.startswith(s + "/") for s in skip):
                continue
            if path.is_symlink():
                state[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                state[rel] = "dir"
            elif path.is_socket():
                state[rel] = "socket"
            else:
                try:
                    state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
                except OSError as exc:
                    state[rel] = f"unreadable:{exc.errno}"
    return state


def diff_trees(before: dict[str, str], after: dict[str, str]) -> list[str]:
    changed = [p for p in after if before.get(p) != after[p]]
    gone = [p for p in before if p not in after]
    return [f"+{p}" for p in changed] + [f"-{p}" for p in gone]


# --------------------------------------------------------------------------- time


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(step)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_SCRATCH: list[Path] = []


def scratch(prefix: str) -> Path:
    """A fresh directory that other users can traverse (the socket-permission tests need it);
    removed by ``remove_scratch`` once the figures passed (kept for a look when they failed)."""
    path = Path(tempfile.mkdtemp(prefix=f"wpkh-{prefix}-"))
    path.chmod(0o755)
    _SCRATCH.append(path)
    return path


def remove_scratch() -> None:
    while _SCRATCH:
        shutil.rmtree(_SCRATCH.pop(), ignore_errors=True)


# --------------------------------------------------------------------------- lab


MARKER_INSTALLER = """#!/bin/sh
echo "installer ran" > "{marker}"
echo ran
"""


@dataclass
class Lab:
    """A lab PKI under ``root``: CA, WPK signer, manager/agent TLS certificates."""

    root: Path
    ca: pki.CaFiles
    signer: pki.CertFiles

    @classmethod
    def create(cls, root: Path) -> Lab:
        ca = pki.create_ca(root / "ca")
        signer = pki.issue_certificate(
            ca.cert, ca.key, root / "certs", "hardening signer", "code", basename="signer"
        )
        return cls(root, ca, signer)

    def tls_pair(self, common_name: str, usage: str) -> pki.CertFiles:
        san = ["127.0.0.1", "localhost"] if usage == "server" else []
        return pki.issue_certificate(
            self.ca.cert,
            self.ca.key,
            self.root / "certs",
            common_name,
            usage,  # type: ignore[arg-type]
            san=san,
            basename=common_name.replace(":", "-").replace(" ", "-"),
        )

    def wpk(self, out: Path, files: dict[str, bytes], installer: str = "upgrade.sh") -> Path:
        """A signed WPK holding ``files`` (name -> content)."""
        src = out.parent / f".src-{out.stem}"
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        paths = []
        for name, content in files.items():
            path = src / name
            path.write_bytes(content)
            paths.append(path)
        wpk.pack(out, self.signer.cert, self.signer.key, paths, installer=installer)
        shutil.rmtree(src, ignore_errors=True)
        return out


# --------------------------------------------------------------------------- processes


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "wpk_upgrade.cli", *args]


class AgentProc:
    """A real ``wpk-upgrade agent`` process with its home under ``home``."""

    def __init__(
        self,
        home: Path,
        agent_id: int,
        address: str,
        *,
        version: str = "v4.8.0",
        ca_store: Path | None = None,
        tls: dict[str, str] | None = None,
        result_wait: float = 0.2,
        extra_upgrade: str = "",
        reconnect_max: float = 0.3,
    ) -> None:
        self.home = home
        self.agent_id = agent_id
        home.mkdir(parents=True, exist_ok=True)
        (home / "etc").mkdir(exist_ok=True)
        (home / "logs").mkdir(exist_ok=True)  # where the demo installer writes its log
        (home / "etc" / "version").write_text(f"{version}\n")
        options = {
            "address": address,
            "reconnect_min": 0.05,
            "reconnect_max": reconnect_max,
            "heartbeat": 2.0,
        }
        if tls is not None:
            options.update(tls)
        else:
            options["tls"] = False
        opts = ", ".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
        ca = (
            f"[upgrade.ca_verification]\nenabled = true\nca_store = [{json.dumps(str(ca_store))}]\n"
            if ca_store is not None
            else "[upgrade.ca_verification]\nenabled = false\n"
        )
        self.config_path = home / "etc" / "agent.toml"
        self.config_path.write_text(
            f"home = {json.dumps(str(home))}\n"
            f'[agent]\nid = {agent_id}\nname = "hard-{agent_id:03d}"\n'
            'os_platform = "ubuntu"\nos_major = "22"\nos_minor = "04"\nos_arch = "x86_64"\n'
            f'[manager]\ntransport = "tcp"\noptions = {{ {opts} }}\n'
            f"[upgrade]\nenabled = true\nresult_wait = {result_wait}\n"
            'notification_wait_start = "1s"\nnotification_wait_max = "2s"\n'
            f'installer_timeout = "30s"\n{extra_upgrade}'
            f"{ca}"
        )
        self.socket = home / "queue" / "sockets" / "upgrade"
        self.log_path = home / "agent.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> AgentProc:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "wpk_upgrade.agent", "--config", str(self.config_path)],
                stderr=log,
                stdout=log,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                start_new_session=True,
            )
        self.starts += 1
        return self

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def connected(self) -> bool:
        try:
            return "status=connected" in (self.home / "var/run/agent.state").read_text()
        except OSError:
            return False

    def answers(self) -> bool:
        try:
            request_unix(str(self.socket), b'{"command":"close","parameters":{"file":"p"}}', 5)
        except OSError:
            return False
        return True

    def wait_serving(self, timeout: float = 30) -> None:
        def ready() -> bool:
            if not self.alive():
                raise AssertionError(f"agent {self.agent_id} died:\n{self.log[-3000:]}")
            return self.answers()

        wait_until(ready, timeout, f"agent {self.agent_id} serving its local socket")

    def open_gate(self) -> None:
        """Allow upgrades without a manager: write a result file and clear it."""
        result = self.home / "var" / "upgrade" / "upgrade_result"
        result.parent.mkdir(parents=True, exist_ok=True)
        result.write_text("0")
        reply = send_json(self.socket, {"command": "clear_upgrade_result", "parameters": {}})
        assert reply["error"] == 0, reply

    def kill(self) -> None:
        """SIGKILL the agent and everything it started (its installer too)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # detached installers of this agent
        return self.proc.returncode


class ManagerProc:
    """A real ``wpk-upgrade manager`` process."""

    def __init__(self, home: Path, config_text: str) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.config_path = home / "manager.toml"
        self.config_path.write_text(config_text)
        self.log_path = home / "manager.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.upgrade_socket = home / "queue" / "tasks" / "upgrade"
        self.task_socket = home / "queue" / "tasks" / "task"

    def start(self, timeout: float = 30) -> ManagerProc:
        for path in (self.upgrade_socket, self.task_socket):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                python_cmd("manager", "--config", str(self.config_path)),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                start_new_session=True,
            )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"manager exited {self.proc.returncode}:\n{self.log}")
            return "ready:" in self.log and self.task_socket.exists()

        wait_until(ready, timeout, "the manager to start")
        return self

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill9()
