"""The windowed transfer (our extension) against the real agent command handler: many ``write``
commands in flight with offsets, ``open`` in resume mode, SHA1 and SHA-256 checked; the
reference exchange kept for ``transfer_mode = "reference"`` and for legacy agents; progress of
acknowledged bytes; the agent-side offset writes and progress file; installer failure and
timeout with a real agent process over mutual TLS.

``LiveAgent`` (an in-process agent: the real ``CommandHandler`` on the real transport) and
``AgentProcess`` (``python -m wpk_upgrade.agent`` with its own certificate) are shared with
``test_transfer_resume.py`` and ``test_scale_agents.py``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_cases_async import custom, pack_wpk, wait_status
from wpk_transport_tcp import TcpOptions, TcpTransport

from wpk_upgrade import cli_ca, pki, wpk
from wpk_upgrade.agent.commands import CommandHandler
from wpk_upgrade.agent.config import AgentConfig, AgentConfigSchema
from wpk_upgrade.agent.result import UpgradeGate
from wpk_upgrade.config import load_data
from wpk_upgrade.interfaces import ManagerChannel
from wpk_upgrade.models import AgentInfo
from wpk_upgrade.testing.harness import ManagerHarness

MakeNode = Callable[..., ManagerHarness]
PLATFORM = {"os_platform": "ubuntu", "os_major": "22", "os_minor": "04", "os_arch": "x86_64"}


# --------------------------------------------------------------------------- helpers


def command_of(target: str, payload: str) -> str:
    if target == "com":
        return payload.split(" ", 1)[0]
    return str(json.loads(payload)["command"])


def params_of(payload: str) -> dict[str, Any]:
    parameters: dict[str, Any] = json.loads(payload)["parameters"]
    return parameters


def agent_config(home: Path, agent_id: int, **upgrade: Any) -> AgentConfig:
    section = {"installer_timeout": 5, "ca_verification": {"enabled": False}, **upgrade}
    config: AgentConfig = load_data(
        {"home": str(home), "agent": {"id": agent_id, **PLATFORM}, "upgrade": section},
        AgentConfigSchema(),
        "test",
    )
    for directory in config.layout_dirs():
        directory.mkdir(parents=True, exist_ok=True)
    return config


class LiveAgent:
    """The real command handler (an agent home under ``home``) on the real transport, in its
    own event-loop thread. ``write_delay`` slows every write down; ``block_from`` holds writes
    at or past that offset until ``release`` is set."""

    def __init__(
        self,
        address: str,
        agent_id: int,
        home: Path,
        *,
        version: str = "Wazuh v4.9.0",
        options: dict[str, Any] | None = None,
        write_delay: float = 0.0,
        block_from: int | None = None,
    ) -> None:
        self.config = agent_config(home, agent_id)
        self.handler = CommandHandler(self.config, UpgradeGate(True))
        self.features = self.handler.features
        self.info = AgentInfo(
            agent_id=agent_id, name=f"live{agent_id}", version=version, **PLATFORM
        )
        base = {"address": address, "reconnect_min": 0.05, "reconnect_max": 0.5, "heartbeat": 2.0}
        self.transport = TcpTransport(TcpOptions(**{**base, **(options or {})}))
        self.received: list[tuple[str, str]] = []
        self.events: list[tuple[str, float]] = []
        self.answered: list[tuple[str, str]] = []
        self.concurrent = 0
        self.max_concurrent = 0
        self.write_delay = write_delay
        self.block_from = block_from
        self.release = threading.Event()
        self.channel: ManagerChannel | None = None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._stop = asyncio.Event()
        self._future: Any = None

    async def handle(self, target: str, payload: str) -> str:
        self.received.append((target, payload))
        self.events.append((command_of(target, payload), time.monotonic()))
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            if target == "upgrade" and '"command":"write"' in payload:
                if self.write_delay:
                    await asyncio.sleep(self.write_delay)
                offset = params_of(payload).get("offset", 0)
                if self.block_from is not None and offset >= self.block_from:
                    while not self.release.is_set():
                        await asyncio.sleep(0.01)
            reply = await self.handler.handle(target, payload)
            self.answered.append((command_of(target, payload), reply))
            return reply
        finally:
            self.concurrent -= 1

    async def _connected(self, channel: ManagerChannel) -> None:
        self.channel = channel

    def start(self) -> LiveAgent:
        self._thread.start()
        self._future = asyncio.run_coroutine_threadsafe(
            self.transport.run_agent(lambda: self.info, self.handle, self._connected, self._stop),
            self.loop,
        )
        return self

    def stop(self) -> None:
        self.release.set()
        self.loop.call_soon_threadsafe(self._stop.set)
        if self._future is not None:
            try:
                self._future.result(10)
            except Exception:  # noqa: BLE001 - stopping a simulator never fails a test
                pass
        self.handler.close_all()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def __enter__(self) -> LiveAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def commands(self) -> list[str]:
        return [command_of(t, p) for t, p in list(self.received)]

    def installed(self) -> bool:
        """True once the ``upgrade`` command has been answered (verified, installer run)."""
        return any(command == "upgrade" for command, _ in list(self.answered))

    def writes(self) -> list[dict[str, Any]]:
        return [params_of(p) for t, p in list(self.received) if command_of(t, p) == "write"]


def wait_connected(h: ManagerHarness, agent_id: int, timeout: float = 20) -> None:
    h.wait_for(lambda: h.manager is not None and h.manager.hub.link(agent_id) is not None, timeout)


def node(make_harness: MakeNode, **upgrade: Any) -> ManagerHarness:
    settings = {
        "chunk_size": 4096,
        "window": 4,
        "command_timeout": 10.0,
        "installer_timeout": 5,
        "open_retry_delay": 0.05,
        **upgrade,
    }
    return make_harness(upgrade=settings)


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> pki.CertFiles:
    root = tmp_path_factory.mktemp("signer")
    ca = pki.create_ca(root / "ca")
    return pki.issue_certificate(ca.cert, ca.key, root, "wpk signer", "code")


def make_wpk(tmp: Path, signer: pki.CertFiles, size: int, name: str = "agent.wpk") -> Any:
    return pack_wpk(tmp, signer, tmp / name, payload=os.urandom(size))


def covered(writes: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """The byte ranges the writes covered, merged."""
    ranges = sorted((w["offset"], w["offset"] + w["length"]) for w in writes)
    merged: list[tuple[int, int]] = []
    for start, end in ranges:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


# --------------------------------------------------------------------------- windowed


def test_windowed_push_to_the_real_handler(
    make_harness: MakeNode, signer: pki.CertFiles, tmp_path: Path
) -> None:
    h = node(make_harness)
    package = make_wpk(tmp_path, signer, 200_000)
    with LiveAgent(h.transport_address, 7, tmp_path / "agent", write_delay=0.005) as agent:
        wait_connected(h, 7)
        custom(h, [7], file_path=str(package.path), installer="upgrade.sh")
        wait_status(h, [7], ["Updating"])
        h.wait_for(agent.installed)
        h.wait_for(lambda: h.result([7])[0].get("progress", {}).get("sent") == package.size)
        commands = agent.commands()
        assert commands[:2] == ["lock_restart", "open"]
        assert commands[-4:] == ["close", "sha1", "sha256", "upgrade"]
        assert set(commands[2:-4]) == {"write"}
        opened = params_of(agent.received[1][1])
        assert opened == {
            "mode": "resume",
            "file": package.path.name,
            "size": package.size,
            "sha1": package.sha1,
            "sha256": package.sha256,
        }
        writes = agent.writes()
        assert all(w["length"] <= 4096 for w in writes)
        assert covered(writes) == [(0, package.size)]
        assert sum(w["length"] for w in writes) == package.size  # nothing sent twice
        assert agent.max_concurrent == 4  # the window
        # verified, unpacked, installer run; the received WPK and its progress file are gone
        incoming = agent.config.incoming_dir
        assert not (incoming / package.path.name).exists()
        assert not (incoming / f"{package.path.name}.progress").exists()
        assert (agent.config.upgrade_dir / "package.bin").stat().st_size == 200_000


@pytest.mark.parametrize("not_ready_wait", [60.0, 0.0])
def test_an_agent_still_in_its_start_up_check_is_waited_for(
    make_harness: MakeNode, signer: pki.CertFiles, tmp_path: Path, not_ready_wait: float
) -> None:
    """An agent that has just started refuses ``open`` ("not ready", code 1) until its
    start-up result check opens the gate (30 s by default): windowed pushes wait that out for
    ``not_ready_wait`` seconds instead of failing after ``open_attempts``; with 0, as the
    reference, the task ends in error 19."""
    h = node(make_harness, open_attempts=3, not_ready_wait=not_ready_wait)
    package = make_wpk(tmp_path, signer, 20_000)
    with LiveAgent(h.transport_address, 9, tmp_path / "agent") as agent:
        agent.handler.gate.block()
        wait_connected(h, 9)
        custom(h, [9], file_path=str(package.path), installer="upgrade.sh")

        def refused_opens() -> int:
            return sum(
                1 for c, reply in list(agent.answered) if c == "open" and '"error":1' in reply
            )

        if not_ready_wait:
            h.wait_for(lambda: refused_opens() > 3)  # past open_attempts, still trying
            agent.loop.call_soon_threadsafe(agent.handler.gate.allow)
            h.wait_for(agent.installed)
            assert "error_msg" not in wait_status(h, [9], ["Updating"])[0]
        else:
            items = wait_status(h, [9], ["Error"])
            assert items[0]["error_msg"] == "Send open file error"
            assert refused_opens() == 3 and not agent.installed()


def test_shared_chunk_budget_bounds_chunks_in_flight(
    make_harness: MakeNode, signer: pki.CertFiles, tmp_path: Path
) -> None:
    """``upgrade.max_inflight_mb``: the node's pushes together hold at most that many bytes of
    chunks not yet answered (here two 4 KB chunks for two agents with a window of 4 each);
    each push still always has one chunk going, and the budget is whole again afterwards."""
    from wpk_upgrade.transfer import ChunkBudget

    h = node(make_harness)
    assert h.manager is not None
    h.manager.dispatcher.chunk_budget = budget = ChunkBudget(2 * 4096)
    package = make_wpk(tmp_path, signer, 100_000)
    with (
        LiveAgent(h.transport_address, 11, tmp_path / "a11", write_delay=0.005) as one,
        LiveAgent(h.transport_address, 12, tmp_path / "a12", write_delay=0.005) as two,
    ):
        wait_connected(h, 11)
        wait_connected(h, 12)
        custom(h, [11, 12], file_path=str(package.path), installer="upgrade.sh")
        h.wait_for(lambda: one.installed() and two.installed())
        # the window is 4, the budget two chunks: a push has at most 2 in flight (its first
        # chunk goes even over the budget, a second one only while it fits)
        assert max(one.max_concurrent, two.max_concurrent) <= 2  # 4 without the budget
        for agent in (one, two):
            assert covered(agent.writes()) == [(0, package.size)]
    assert budget.used == 0


def test_reference_mode_keeps_the_reference_exchange(
    make_harness: MakeNode, signer: pki.CertFiles, tmp_path: Path
) -> None:
    """``transfer_mode = "reference"``: the same agent gets exactly the reference sequence,
    one write at a time, without offsets."""
    h = node(make_harness, transfer_mode="reference")
    package = make_wpk(tmp_path, signer, 50_000)
    with LiveAgent(h.transport_address, 8, tmp_path / "agent") as agent:
        wait_connected(h, 8)
        custom(h, [8], file_path=str(package.path), installer="upgrade.sh")
        wait_status(h, [8], ["Updating"])
        h.wait_for(agent.installed)
        commands = agent.commands()
        writes = commands.count("write")
        assert writes == -(-package.size // 4096)
        assert commands == ["lock_restart", "open", *["write"] * writes, "close", "sha1", "upgrade"]
        assert params_of(agent.received[1][1]) == {"mode": "wb", "file": package.path.name}
        assert all("offset" not in w for w in agent.writes())
        assert agent.max_concurrent == 1


def test_legacy_agent_keeps_the_legacy_exchange(
    make_harness: MakeNode, signer: pki.CertFiles, tmp_path: Path
) -> None:
    """An agent older than v4.1.0 gets the legacy ``com`` sequence even though its handler
    announces the extensions."""
    h = node(make_harness)
    package = make_wpk(tmp_path, signer, 20_000)
    agent = LiveAgent(h.transport_address, 9, tmp_path / "agent", version="Wazuh v3.13.0")
    with agent:
        wait_connected(h, 9)
        custom(h, [9], file_path=str(package.path), installer="upgrade.sh")
        wait_status(h, [9], ["Updating"])
        h.wait_for(agent.installed)
        assert {t for t, _ in agent.received} == {"com"}
        commands = agent.commands()
        assert commands[:2] == ["lock_restart", "open"]
        assert commands[-3:] == ["close", "sha1", "upgrade"]


def test_progress_shows_acknowledged_bytes(
    make_harness: MakeNode, signer: pki.CertFiles, tmp_path: Path
) -> None:
    """Writes from byte 40960 on are held: the recorded progress stops exactly at the
    acknowledged contiguous prefix (never counting chunks sent but unanswered), then reaches
    the total once released."""
    h = node(make_harness)
    package = make_wpk(tmp_path, signer, 120_000)
    agent = LiveAgent(h.transport_address, 10, tmp_path / "agent", block_from=40960)
    with agent:
        wait_connected(h, 10)
        custom(h, [10], file_path=str(package.path), installer="upgrade.sh")

        def progress() -> dict[str, int]:
            value: dict[str, int] = h.result([10])[0].get("progress") or {}
            return value

        h.wait_for(lambda: progress().get("sent") == 40960, 10)
        assert progress() == {"sent": 40960, "total": package.size}
        time.sleep(0.3)
        assert agent.concurrent == 4  # the window, all waiting
        agent.release.set()
        h.wait_for(lambda: progress().get("sent") == package.size, 15)
        wait_status(h, [10], ["Updating"])


def test_a_resumed_copy_that_does_not_match_is_sent_again(
    make_harness: MakeNode, signer: pki.CertFiles, tmp_path: Path
) -> None:
    """The agent holds a corrupted first half that its progress file claims for this very
    WPK: the manager resumes at the half, the digests differ, so it starts the file over once
    (``open`` wb, then resume at 0) and succeeds."""
    h = node(make_harness)
    package = make_wpk(tmp_path, signer, 64_000)
    home = tmp_path / "agent"
    config = agent_config(home, 11)
    half = 32768
    target = config.incoming_dir / package.path.name
    target.write_bytes(b"\0" * half)
    record = {
        "file": package.path.name,
        "size": package.size,
        "sha1": package.sha1,
        "sha256": package.sha256,
        "contiguous": half,
    }
    Path(f"{target}.progress").write_text(json.dumps(record))
    with LiveAgent(h.transport_address, 11, home) as agent:
        wait_connected(h, 11)
        custom(h, [11], file_path=str(package.path), installer="upgrade.sh")
        wait_status(h, [11], ["Updating"])
        h.wait_for(agent.installed)
        opens = [params_of(p)["mode"] for t, p in agent.received if command_of(t, p) == "open"]
        assert opens == ["resume", "wb", "resume"]
        offsets = [w["offset"] for w in agent.writes()]
        assert offsets[0] == half and 0 in offsets
        assert (config.upgrade_dir / "package.bin").exists()


# --------------------------------------------------------------------------- agent side


def json_reply(text: str) -> dict[str, Any]:
    reply: dict[str, Any] = json.loads(text)
    return reply


def run(handler: CommandHandler, command: str, **params: Any) -> dict[str, Any]:
    payload = json.dumps({"command": command, "parameters": params})
    return json_reply(asyncio.run(handler.handle("upgrade", payload)))


def chunk_write(handler: CommandHandler, name: str, data: bytes, offset: int) -> dict[str, Any]:
    buffer = base64.b64encode(data[offset : offset + 1000]).decode()
    return run(handler, "write", file=name, buffer=buffer, length=1000, offset=offset)


def test_agent_offset_writes_and_persisted_prefix(tmp_path: Path) -> None:
    config = agent_config(tmp_path, 3)
    data = os.urandom(5000)
    ident = {"size": 5000, "sha1": "ab" * 20, "sha256": "cd" * 32}
    handler = CommandHandler(config, UpgradeGate(True))
    assert run(handler, "open", mode="resume", file="f.wpk", **ident)["message"] == "0"
    # out of order: 0, 2000, 1000 -> contiguous 3000; 4000 alone does not extend it
    for offset in (0, 2000, 1000, 4000):
        assert chunk_write(handler, "f.wpk", data, offset)["error"] == 0
    progress_file = config.incoming_dir / "f.wpk.progress"
    handler.close_all()  # the agent stops (a restart would do the same)
    assert json.loads(progress_file.read_text())["contiguous"] == 3000

    again = CommandHandler(config, UpgradeGate(True))
    assert run(again, "open", mode="resume", file="f.wpk", **ident)["message"] == "3000"
    # plain writes (no offset) continue where the resume point is
    rest = base64.b64encode(data[3000:]).decode()
    assert run(again, "write", file="f.wpk", buffer=rest, length=2000)["error"] == 0
    assert run(again, "close", file="f.wpk")["error"] == 0
    assert (config.incoming_dir / "f.wpk").read_bytes() == data
    assert json.loads(progress_file.read_text())["contiguous"] == 5000

    # another WPK under the same name (different digest) starts afresh
    other = {**ident, "sha256": "ee" * 32}
    third = CommandHandler(config, UpgradeGate(True))
    assert run(third, "open", mode="resume", file="f.wpk", **other)["message"] == "0"
    assert (config.incoming_dir / "f.wpk").stat().st_size == 0
    # writes past the announced size, bad offsets, missing resume data
    past = base64.b64encode(b"x" * 10).decode()
    reply = run(third, "write", file="f.wpk", buffer=past, length=10, offset=4995)
    assert reply["error"] == 10
    for bad in (-1, "3", True):
        reply = run(third, "write", file="f.wpk", buffer=past, length=10, offset=bad)
        assert reply["error"] == 3
    assert run(third, "open", mode="resume", file="f.wpk", size=10)["error"] == 3
    assert run(third, "open", mode="resume", file="f.wpk", sha1="ab")["error"] == 3
    assert run(third, "open", mode="resume", file="../x", **ident)["error"] == 5
    # the reference open removes the progress file
    assert run(third, "open", mode="wb", file="f.wpk")["error"] == 0
    assert not progress_file.exists()
    assert CommandHandler.features == ("offset", "resume", "sha256")


def test_agent_resume_ignores_a_progress_file_longer_than_the_data(tmp_path: Path) -> None:
    """A progress file claiming more than the file holds (the data was lost) resumes at what
    the file really holds."""
    config = agent_config(tmp_path, 3)
    ident = {"size": 5000, "sha1": "ab" * 20, "sha256": None}
    (config.incoming_dir / "g.wpk").write_bytes(b"y" * 1200)
    record = {"file": "g.wpk", "size": 5000, "sha1": "ab" * 20, "sha256": None, "contiguous": 4000}
    (config.incoming_dir / "g.wpk.progress").write_text(json.dumps(record))
    handler = CommandHandler(config, UpgradeGate(True))
    assert run(handler, "open", mode="resume", file="g.wpk", **ident)["message"] == "1200"


# --------------------------------------------------------------------------- real processes


class AgentProcess:
    """``python -m wpk_upgrade.agent`` with its own home, certificate and log."""

    def __init__(
        self,
        home: Path,
        agent_id: int,
        address: str,
        *,
        tls: dict[str, str] | None = None,
        version: str = "v4.9.0",
        ca_store: Path | None = None,
        installer_timeout: float = 10,
        heartbeat: float = 1.0,
    ) -> None:
        self.home = home
        self.agent_id = agent_id
        (home / "etc").mkdir(parents=True, exist_ok=True)
        (home / "etc" / "version").write_text(f"{version}\n")
        options = {
            "address": address,
            "reconnect_min": 0.05,
            "reconnect_max": 0.5,
            "heartbeat": heartbeat,
            **(tls or {}),
        }
        rendered = ", ".join(
            f"{k} = {json.dumps(v)}" if isinstance(v, str) else f"{k} = {v}"
            for k, v in options.items()
        )
        ca = (
            f"ca_verification = {{ ca_store = [{json.dumps(str(ca_store))}] }}\n"
            if ca_store
            else "ca_verification = { enabled = false }\n"
        )
        self.config_path = home / "etc" / "agent.toml"
        self.config_path.write_text(
            f"home = {json.dumps(str(home))}\n"
            f'[agent]\nid = {agent_id}\nname = "proc{agent_id}"\n'
            + "".join(f'{k} = "{v}"\n' for k, v in PLATFORM.items())
            + f'[manager]\ntransport = "tcp"\noptions = {{ {rendered} }}\n'
            + f"[upgrade]\nresult_wait = 0.2\nnotification_wait_start = 0.5\n"
            f"installer_timeout = {installer_timeout}\n{ca}"
        )
        self.log_path = home / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "wpk_upgrade.agent", "--config", str(self.config_path)],
                stderr=log,
                stdout=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """``kill -9``."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def issue_agents(ca_dir: Path, root: Path, ids: list[int]) -> dict[int, dict[str, str]]:
    """EC client certificates (fast to make) for ``ids``; transport options per agent."""
    out = {}
    for agent_id in ids:
        issued = cli_ca.issue_agent(ca_dir, agent_id, root / f"cert{agent_id}", key_type="ec")
        out[agent_id] = {"ca": str(issued.ca), "cert": str(issued.cert), "key": str(issued.key)}
    return out


@pytest.fixture(scope="module")
def transport_pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tpki")
    ca_dir = root / "ca"
    cli_ca.init_ca(ca_dir, key_type="ec")
    manager = cli_ca.issue_manager(ca_dir, root / "manager", ["127.0.0.1"], key_type="ec")
    return {
        "root": root,
        "ca_dir": ca_dir,
        "manager": {
            "ca": str(ca_dir / "ca.pem"),
            "cert": str(manager.cert),
            "key": str(manager.key),
        },
    }


def tls_manager(
    make_harness: MakeNode,
    transport_pki: dict[str, Any],
    listen: str = "127.0.0.1:0",
    **upgrade: Any,
) -> ManagerHarness:
    settings = {
        "chunk_size": 32768,
        "command_timeout": 20.0,
        "installer_timeout": 5,
        "open_retry_delay": 0.1,
        **upgrade,
    }
    options = {"listen": listen, "heartbeat": 1.0, **transport_pki["manager"]}
    return make_harness(upgrade=settings, transport={"name": "tcp", "options": options})


def installer_wpk(tmp: Path, signer: pki.CertFiles, script: str, name: str) -> wpk.PackResult:
    src = tmp / f"src-{name}"
    src.mkdir()
    (src / "upgrade.sh").write_text(script)
    (src / "data.bin").write_bytes(os.urandom(100_000))
    return wpk.pack(tmp / name, signer.cert, signer.key, [src / "upgrade.sh", src / "data.bin"])


@pytest.fixture
def processes() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for proc in started:
        proc.stop()


@pytest.mark.parametrize(
    "script,agent_says",
    [
        ("#!/bin/sh\necho broken >&2\nexit 3\n", "installer exit status '3'"),
        ("#!/bin/sh\nsleep 30\n", "Error executing command"),
    ],
    ids=["installer-fails", "installer-times-out"],
)
def test_installer_failure_and_timeout_with_a_real_agent(
    make_harness: MakeNode,
    transport_pki: dict[str, Any],
    signer: pki.CertFiles,
    tmp_path: Path,
    processes: list[AgentProcess],
    script: str,
    agent_says: str,
) -> None:
    """A real agent process over mutual TLS receives the WPK (windowed), verifies it against
    its CA store and runs the installer, which exits 3 / outlives the agent's 1 s installer
    timeout (its process group is killed): the task ends Error "Send upgrade command error",
    the history says why."""
    h = tls_manager(make_harness, transport_pki)
    certs = issue_agents(transport_pki["ca_dir"], tmp_path, [21])
    ca_store = tmp_path / "wpk_root.pem"
    ca_store.write_bytes(Path(signer.cert).parent.joinpath("ca", "ca.pem").read_bytes())
    agent = AgentProcess(
        tmp_path / "a21",
        21,
        h.transport_address,
        tls=certs[21],
        ca_store=ca_store,
        installer_timeout=1,
    )
    processes.append(agent.start())
    wait_connected(h, 21)
    h.wait_for(lambda: "upgrades allowed" in agent.log, 20)
    package = installer_wpk(tmp_path, signer, script, "fail.wpk")
    custom(h, [21], file_path=str(package.path), installer="upgrade.sh")
    (item,) = h.wait_final([21], timeout=30)
    assert (item["status"], item["error_msg"]) == ("Error", "Send upgrade command error")
    assert item["progress"] == {"sent": package.size, "total": package.size}
    task_id = item["task_id"]
    reasons = " ".join(c.reason or "" for c in h.store.history(task_id))
    assert agent_says in reasons


def test_request_data_default_writes_the_reference_base64_buffer() -> None:
    """A link that cannot carry bytes gets the reference text: the chunk's base64 in the
    ``buffer`` that ``request_data``'s payload leaves empty."""
    from wpk_upgrade.interfaces import AgentLink

    class TextLink(AgentLink):
        agent_id = 1

        def __init__(self) -> None:
            self.sent: list[tuple[str, str]] = []

        async def request(self, target: str, payload: str, timeout: float) -> str:
            self.sent.append((target, payload))
            return '{"error":0,"message":"ok","data":[]}'

        async def close(self) -> None:
            return None

    link = TextLink()
    data = os.urandom(5000)
    payload = json.dumps(
        {"command": "write", "parameters": {"buffer": "", "length": 5000, "file": "a.wpk"}},
        separators=(",", ":"),
    )
    asyncio.run(link.request_data("upgrade", payload, data, 5))
    [(target, text)] = link.sent
    parameters = json.loads(text)["parameters"]
    assert target == "upgrade" and base64.b64decode(parameters["buffer"]) == data
    assert parameters["length"] == 5000 and parameters["file"] == "a.wpk"
