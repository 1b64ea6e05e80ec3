"""The agent's local socket (framing, limits, robustness) and the agent as a real process:
SIGHUP re-exec (same pid, version re-read, lock_restart honoured), SIGTERM clean stop, a
transport that cannot connect or cannot be loaded."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wpk_upgrade.agent.commands import CommandHandler
from wpk_upgrade.agent.config import AgentConfig, AgentConfigSchema
from wpk_upgrade.agent.daemon import AgentDaemon
from wpk_upgrade.agent.local_socket import LocalSocketServer
from wpk_upgrade.agent.result import UpgradeGate
from wpk_upgrade.config import load_data
from wpk_upgrade.errors import WpkUpgradeError
from wpk_upgrade.framing import request_unix
from wpk_upgrade.testing.harness import ManagerHarness, manager_config

OK = {"error": 0, "message": "ok", "data": []}
DISABLED = {"error": 1, "message": "Upgrade module is disabled or not ready yet", "data": []}
NOT_FOUND = {"error": 2, "message": "Command not found", "data": []}
NOT_OPENED = {
    "error": 7,
    "message": "File not opened. Agent might have been auto-restarted during upgrade",
    "data": [],
}


def cmd(command: str, **parameters: Any) -> bytes:
    return json.dumps({"command": command, "parameters": parameters}).encode()


@pytest.fixture
def home() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="wpks-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_config(home: Path, **data: Any) -> AgentConfig:
    config: AgentConfig = load_data(
        {"home": str(home), "agent": {"id": 5}, **data}, AgentConfigSchema(), "test"
    )
    for directory in config.layout_dirs():
        directory.mkdir(parents=True, exist_ok=True)
    return config


def raw_exchange(path: Path, data: bytes, *, shutdown: bool = False) -> bytes:
    """Send raw bytes and read until the server closes (the framed reply, or nothing)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(data)
        if shutdown:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def decode(frame: bytes) -> dict[str, Any]:
    (size,) = struct.unpack("<I", frame[:4])
    assert len(frame) == 4 + size
    parsed: dict[str, Any] = json.loads(frame[4:])
    return parsed


def serve(config: AgentConfig, scenario: Any, max_message_size: int = 65536) -> None:
    """Run a local socket server for ``scenario(path)`` (a blocking function, in a thread)."""

    async def main() -> None:
        handler = CommandHandler(config, UpgradeGate(True))
        server = LocalSocketServer(config.socket_path, handler.handle, max_message_size)
        await server.start()
        try:
            await asyncio.to_thread(scenario, config.socket_path)
        finally:
            handler.close_all()
            await server.close()
        assert not config.socket_path.exists()

    asyncio.run(main())


# --------------------------------------------------------------------------- local socket


def test_socket_mode_and_basic_exchange(home: Path) -> None:
    config = make_config(home)

    def scenario(path: Path) -> None:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        assert json.loads(request_unix(str(path), cmd("open", mode="wb", file="f"))) == OK

    serve(config, scenario)


def test_bad_requests_get_coded_replies_and_server_keeps_serving(home: Path) -> None:
    config = make_config(home)

    def scenario(path: Path) -> None:
        def frame(payload: bytes) -> bytes:
            return struct.pack("<I", len(payload)) + payload

        assert decode(raw_exchange(path, frame(b"not json"))) == NOT_FOUND
        assert decode(raw_exchange(path, frame(b"\xff\xfe{}"))) == NOT_FOUND  # not UTF-8
        oversized = frame(b"x" * 5000)
        assert decode(raw_exchange(path, oversized)) == NOT_FOUND
        # an absurd announced size: refused without reading (or waiting for) the body
        assert decode(raw_exchange(path, struct.pack("<I", 1 << 30))) == NOT_FOUND
        # truncated frames and silent clients get no reply, and do not hurt the server
        assert raw_exchange(path, struct.pack("<I", 100) + b"short", shutdown=True) == b""
        assert raw_exchange(path, b"\x01\x00", shutdown=True) == b""
        assert raw_exchange(path, b"", shutdown=True) == b""
        assert json.loads(request_unix(str(path), cmd("open", mode="wb", file="f"))) == OK

    serve(config, scenario, max_message_size=1024)


def test_concurrent_clients(home: Path) -> None:
    config = make_config(home)
    for i in range(20):
        (config.incoming_dir / f"f{i}").write_bytes(b"%d" % i)

    def scenario(path: Path) -> None:
        import concurrent.futures
        import hashlib

        def ask(i: int) -> dict[str, Any]:
            return json.loads(request_unix(str(path), cmd("sha1", file=f"f{i}")))

        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            replies = list(pool.map(ask, range(20)))
        assert [r["message"] for r in replies] == [
            hashlib.sha1(b"%d" % i).hexdigest() for i in range(20)
        ]

    serve(config, scenario)


def test_stale_socket_is_replaced_live_one_is_not(home: Path) -> None:
    config = make_config(home)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(config.socket_path))
    stale.close()  # a socket file nobody listens on (an agent that crashed)

    async def main() -> None:
        handler = CommandHandler(config, UpgradeGate(True))
        first = LocalSocketServer(config.socket_path, handler.handle)
        await first.start()
        second = LocalSocketServer(config.socket_path, handler.handle)
        with pytest.raises(WpkUpgradeError, match="already listening"):
            await second.start()
        assert config.socket_path.is_socket()
        reply = await asyncio.to_thread(
            request_unix, str(config.socket_path), cmd("close", file="x")
        )
        assert json.loads(reply)["error"] == 8
        await first.close()

    asyncio.run(main())


def test_daemon_serves_locally_while_transport_cannot_load(
    home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(home, manager={"transport": "no-such-transport"})
    daemon = AgentDaemon(config)

    async def main() -> None:
        running = asyncio.create_task(daemon.run())
        while not config.socket_path.is_socket():
            await asyncio.sleep(0.02)
        reply = await asyncio.to_thread(
            request_unix, str(config.socket_path), cmd("open", mode="w", file="f")
        )
        assert json.loads(reply) == DISABLED
        assert config.pid_file.read_text() == f"{os.getpid()}\n"
        assert config.state_file.read_text() == "status=disconnected\n"
        daemon.request_stop()
        assert await running == 0

    asyncio.run(main())
    assert "no wpk_upgrade.transports driver named 'no-such-transport'" in caplog.text
    assert not config.socket_path.exists() and not config.pid_file.exists()


# --------------------------------------------------------------------------- real processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class AgentProcess:
    """``python -m wpk_upgrade.agent --config FILE`` with stderr in a file we can watch."""

    def __init__(
        self, home: Path, address: str, result_wait: float = 0.1, extra_config: str = ""
    ) -> None:
        self.home = home
        self.config_path = home / "etc" / "agent.toml"
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            f'home = "{home}"\n[agent]\nid = 5\nname = "proc"\n'
            f'[manager]\ntransport = "tcp"\n'
            f'options = {{ address = "{address}", reconnect_min = 0.05, heartbeat = 2.0 }}\n'
            f"[upgrade]\nresult_wait = {result_wait}\n{extra_config}"
        )
        self.socket = home / "queue" / "sockets" / "upgrade"
        self.log_path = home / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "wpk_upgrade.agent", "--config", str(self.config_path)],
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, predicate: Any, what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            assert self.proc is not None and self.proc.poll() is None, self.log
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}\n{self.log}")

    def wait_started(self, count: int) -> None:
        self.wait_for(
            lambda: self.log.count(" starting, pid ") >= count and self._answers(),
            f"start #{count}",
        )

    def _answers(self) -> bool:
        try:
            self.request(cmd("close", file="probe"))
        except OSError:
            return False
        return True

    def request(self, payload: bytes) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(request_unix(str(self.socket), payload, 10))
        return parsed

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)


def test_agent_process_restart_and_stop(home: Path) -> None:
    (home / "etc").mkdir()
    (home / "etc" / "version").write_text("v4.9.0\n")
    agent = AgentProcess(home, f"127.0.0.1:{free_port()}").start()  # nobody listens there
    try:
        agent.wait_started(1)
        assert agent.proc is not None
        pid = agent.proc.pid
        assert (home / "var" / "run" / "agent.pid").read_text() == f"{pid}\n"
        assert (home / "var" / "run" / "agent.state").read_text() == "status=disconnected\n"
        assert "version v4.9.0 starting" in agent.log
        # never connected, so the start-up check has not allowed upgrades
        assert agent.request(cmd("open", mode="wb", file="a.wpk")) == DISABLED
        result = home / "var" / "upgrade" / "upgrade_result"
        result.write_text("0")
        assert agent.request(cmd("clear_upgrade_result")) == OK
        assert agent.request(cmd("open", mode="wb", file="a.wpk")) == OK

        # SIGHUP: the installer's way to restart us. Same pid, new version announced.
        (home / "etc" / "version").write_text("v4.9.1\n")
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_started(2)
        assert agent.proc.poll() is None and agent.proc.pid == pid
        assert "version v4.9.1 starting" in agent.log
        assert (home / "var" / "run" / "agent.pid").read_text() == f"{pid}\n"
        # memory is gone (C117): upgrades not allowed yet, then the open file is unknown
        assert agent.request(cmd("write", file="a.wpk", buffer="QUJD", length=3)) == DISABLED
        result.write_text("0")
        assert agent.request(cmd("clear_upgrade_result")) == OK
        assert agent.request(cmd("write", file="a.wpk", buffer="QUJD", length=3)) == NOT_OPENED

        assert agent.stop() == 0
        assert not agent.socket.exists()
        assert not (home / "var" / "run" / "agent.pid").exists()
        assert "agent stopped" in agent.log
    finally:
        agent.stop()


def test_agent_process_logs_json_lines(home: Path) -> None:
    """``[logging] format = "json"``: every line on stderr and in the log file is one JSON
    object with the agent's id, across a restart and the stop."""
    agent = AgentProcess(
        home,
        f"127.0.0.1:{free_port()}",
        extra_config='[logging]\nformat = "json"\nfile = "logs/agent.log"\n',
    ).start()
    try:
        agent.wait_for(lambda: "starting, pid" in agent.log and agent._answers(), "start")
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_for(lambda: agent.log.count("starting, pid") >= 2, "restart")
        agent.wait_for(agent._answers, "an agent answering")
    finally:
        assert agent.stop() == 0
    for text in (agent.log, (home / "logs" / "agent.log").read_text()):
        entries = [json.loads(line) for line in text.splitlines()]
        assert len(entries) >= 4
        for entry in entries:
            assert entry["agent_id"] == 5 and entry["level"] in ("INFO", "WARNING")
            assert entry["logger"].startswith("wpk_") and entry["time"].endswith("Z")
        messages = [entry["message"] for entry in entries]
        assert sum("starting, pid" in m for m in messages) == 2
        assert any("agent stopped" in m for m in messages)


def test_signal_storm_is_never_fatal_and_stop_wins(home: Path) -> None:
    """SIGHUPs arriving at any moment of a restart (shutdown, execv, start-up) wait while no
    handler is installed instead of killing the agent; a SIGTERM right after them stops it
    cleanly, even in the middle of a restart."""
    agent = AgentProcess(home, f"127.0.0.1:{free_port()}").start()
    agent.wait_started(1)
    assert agent.proc is not None
    for _ in range(15):
        time.sleep(0.07)
        agent.proc.send_signal(signal.SIGHUP)
        assert agent.proc.poll() is None, agent.log
    agent.wait_for(agent._answers, "an agent answering")
    assert agent.log.count(" starting, pid ") >= 2
    for _ in range(3):
        agent.proc.send_signal(signal.SIGHUP)
        time.sleep(0.02)
    assert agent.stop() == 0, agent.log
    assert not agent.socket.exists()
    assert not (home / "var" / "run" / "agent.pid").exists()


def test_second_agent_on_the_same_home_refuses_to_start(home: Path) -> None:
    first = AgentProcess(home, f"127.0.0.1:{free_port()}").start()
    try:
        first.wait_started(1)
        second = subprocess.run(
            [sys.executable, "-m", "wpk_upgrade.agent", "--config", str(first.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 1
        assert "another agent is already listening" in second.stderr
        assert first._answers()
        assert first.proc is not None
        pid_file = home / "var" / "run" / "agent.pid"
        assert pid_file.read_text() == f"{first.proc.pid}\n"
    finally:
        assert first.stop() == 0


def test_bad_config_exits_2(home: Path) -> None:
    path = home / "agent.toml"
    path.write_text("[agent]\nid = 0\n")
    proc = subprocess.run(
        [sys.executable, "-m", "wpk_upgrade.agent", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "agent.id:" in proc.stderr and "home: Missing data" in proc.stderr


def test_lock_restart_defers_sighup(home: Path, tmp_path: Path) -> None:
    """The manager sends ``com lock_restart 2`` over the real transport; a SIGHUP right after
    is held until the lock expires."""
    with ManagerHarness(manager_config(tmp_path / "manager")) as harness:
        agent = AgentProcess(home, harness.transport_address).start()
        try:
            agent.wait_started(1)
            state = home / "var" / "run" / "agent.state"
            agent.wait_for(lambda: state.read_text() == "status=connected\n", "connection")
            assert harness.manager is not None
            hub = harness.manager.hub
            agent.wait_for(lambda: hub.link(5) is not None, "manager sees the agent")

            async def lock() -> str:
                link = hub.link(5)
                assert link is not None
                return await link.request("com", "lock_restart 2", 10)

            assert harness.run(lock()) == "ok "
            assert agent.proc is not None
            hup = time.monotonic()
            agent.proc.send_signal(signal.SIGHUP)
            agent.wait_started(2)
            assert time.monotonic() - hup >= 1.9
            assert "deferred up to 2 s by lock_restart" in agent.log
            # it reconnects after the restart
            agent.wait_for(lambda: agent.log.count("connected to the manager") >= 2, "reconnect")
        finally:
            assert agent.stop() == 0


# Like the reference upgrade.sh: exit 0 at once; a background part "installs" (new version
# file), restarts the agent with SIGHUP, waits until it is connected again and writes the result.
UPGRADE_SH = """#!/bin/sh
state="$WPK_AGENT_HOME/var/run/agent.state"
(
  sleep 0.2
  cp version "$WPK_AGENT_HOME/etc/version"
  kill -HUP "$(cat "$WPK_AGENT_HOME/var/run/agent.pid")"
  i=0
  while ! grep -q status=disconnected "$state" && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
  while ! grep -q status=connected "$state" && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done
  printf 0 > "$WPK_AGENT_HOME/var/upgrade/upgrade_result"
) >/dev/null 2>&1 &
exit 0
"""


def test_c115_real_upgrade_end_to_end(home: Path, tmp_path: Path) -> None:
    """C115 with our own parts: a manager node, the agent as a process, a WPK signed by a lab
    CA the agent trusts. The manager pushes it (upgrade_custom); the installer restarts the
    agent, which reports "Done" and announces the new version."""
    from wpk_upgrade import pki, wpk

    ca = pki.create_ca(tmp_path / "ca")
    signer = pki.issue_certificate(ca.cert, ca.key, tmp_path / "signer", "signer", "code")
    src = tmp_path / "src"
    src.mkdir()
    (src / "upgrade.sh").write_text(UPGRADE_SH)
    (src / "version").write_text("v4.9.1\n")
    package = tmp_path / "agent_v4.9.1.wpk"
    wpk.pack(package, signer.cert, signer.key, [src / "upgrade.sh", src / "version"])
    (home / "etc").mkdir()
    shutil.copy(ca.cert, home / "etc" / "wpk_root.pem")
    (home / "etc" / "version").write_text("v4.9.0\n")

    with ManagerHarness(manager_config(tmp_path / "manager")) as harness:
        agent = AgentProcess(home, harness.transport_address, result_wait=1.5)
        agent.start()
        try:
            agent.wait_started(1)
            assert harness.manager is not None
            hub = harness.manager.hub
            agent.wait_for(lambda: hub.link(5) is not None, "manager sees the agent")
            agent.wait_for(lambda: "upgrades allowed" in agent.log, "start-up result check")
            reply = harness.upgrade(
                {
                    "origin": {"module": "api"},
                    "command": "upgrade_custom",
                    "parameters": {
                        "agents": [5],
                        "file_path": str(package),
                        "installer": "upgrade.sh",
                    },
                }
            )
            assert reply["error"] == 0, reply
            (item,) = harness.wait_final([5], timeout=40)
            assert item["status"] == "Updated", (item, agent.log)
            assert agent.log.count(" starting, pid ") == 2
            assert "version v4.9.1 starting" in agent.log
            assert "reported upgrade result 0 (Done)" in agent.log
            harness.wait_for(lambda: not (home / "var/upgrade/upgrade_result").exists())
            stored = harness.store.get_agent(5)
            assert stored is not None and stored.version == "v4.9.1"
        finally:
            assert agent.stop() == 0
