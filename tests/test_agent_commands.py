"""The agent's command handler: black-box cases H (C094-C111), C116, a C117-like restart, the
``upgrade`` pipeline with real signed WPKs, and the legacy ``com`` target.

Every JSON case runs twice: straight through ``CommandHandler.handle`` and through the real
local UNIX socket (``LocalSocketServer`` + ``framing.request_unix``). Replies are compared as
whole JSON objects.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from wpk_upgrade import pki, wpk
from wpk_upgrade.agent.commands import CommandHandler, RestartLock
from wpk_upgrade.agent.config import AgentConfig, AgentConfigSchema
from wpk_upgrade.agent.local_socket import LocalSocketServer
from wpk_upgrade.agent.result import UpgradeGate
from wpk_upgrade.config import load_data
from wpk_upgrade.framing import request_unix

ROOT = Path(__file__).resolve().parent.parent


def answer(code: int, message: str) -> dict[str, Any]:
    return {"error": code, "message": message, "data": []}


OK = answer(0, "ok")
DISABLED = answer(1, "Upgrade module is disabled or not ready yet")
NOT_FOUND = answer(2, "Command not found")
REQUIRED = answer(3, "Required parameters were not found")
BAD_NAME = answer(5, "Invalid file name")
NOT_OPENED = answer(7, "File not opened. Agent might have been auto-restarted during upgrade")
CANNOT_WRITE = answer(10, "Cannot write file")


def cmd(command: str, **parameters: Any) -> dict[str, Any]:
    return {"command": command, "parameters": parameters}


# --------------------------------------------------------------------------- harness


@pytest.fixture
def home() -> Iterator[Path]:
    """A short agent home (UNIX socket paths must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="wpka-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_config(home: Path, **upgrade: Any) -> AgentConfig:
    data = {"home": str(home), "agent": {"id": 5, "name": "web-01"}, "upgrade": upgrade}
    config: AgentConfig = load_data(data, AgentConfigSchema(), "test")
    for directory in config.layout_dirs():
        directory.mkdir(parents=True, exist_ok=True)
    return config


@dataclass
class Agent:
    """A command handler reached directly (``via="handler"``) or through its local socket."""

    handler: CommandHandler
    via: str

    async def send(self, message: dict[str, Any] | str | bytes) -> dict[str, Any]:
        text = await self.send_raw(message)
        parsed: dict[str, Any] = json.loads(text)
        return parsed

    async def send_raw(self, message: dict[str, Any] | str | bytes) -> str:
        if isinstance(message, dict):
            message = json.dumps(message)
        if self.via == "handler":
            text = message.decode() if isinstance(message, bytes) else message
            return await self.handler.handle("upgrade", text)
        raw = message if isinstance(message, bytes) else message.encode()
        path = str(self.handler.config.socket_path)
        reply = await asyncio.to_thread(request_unix, path, raw, 30.0)
        return reply.decode()


Scenario = Callable[[Agent], Awaitable[None]]


def drive(config: AgentConfig, via: str, scenario: Scenario, *, allowed: bool = True) -> None:
    """Run ``scenario`` against a fresh handler (and its socket server when ``via=socket``)."""

    async def main() -> None:
        handler = CommandHandler(config, UpgradeGate(allowed), RestartLock())
        server = None
        if via == "socket":
            server = LocalSocketServer(config.socket_path, handler.handle)
            await server.start()
        try:
            await scenario(Agent(handler, via))
        finally:
            handler.close_all()
            if server is not None:
                await server.close()

    asyncio.run(main())


@pytest.fixture(params=["handler", "socket"])
def via(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --------------------------------------------------------------------------- H cases


def test_c094_clear_upgrade_result_enables_upgrades(home: Path, via: str) -> None:
    config = make_config(home)
    config.result_file.write_text("0")

    async def scenario(agent: Agent) -> None:
        assert await agent.send(cmd("open", mode="w", file="f")) == DISABLED
        assert await agent.send(cmd("clear_upgrade_result")) == OK
        assert not config.result_file.exists()
        assert agent.handler.gate.allowed
        assert await agent.send(cmd("open", mode="w", file="f")) == OK

    drive(config, via, scenario, allowed=False)


@pytest.mark.parametrize("state", ["missing", "not removable"])
def test_c095_clear_upgrade_result_cannot_remove(home: Path, via: str, state: str) -> None:
    config = make_config(home)
    if state == "not removable":
        # A directory in its place: unlink() fails (EISDIR) even for root.
        (config.result_file / "inside").mkdir(parents=True)

    async def scenario(agent: Agent) -> None:
        expected = answer(19, "Could not erase upgrade_result file")
        assert await agent.send(cmd("clear_upgrade_result")) == expected
        assert not agent.handler.gate.allowed
        assert await agent.send(cmd("open", mode="w", file="f")) == DISABLED

    drive(config, via, scenario, allowed=False)


def test_c096_command_while_upgrades_not_allowed(home: Path, via: str) -> None:
    config = make_config(home)

    async def scenario(agent: Agent) -> None:
        assert await agent.send(cmd("open", mode="w", file="test_file")) == DISABLED
        for message in (
            cmd("write", file="test_file", buffer="QUJD", length=3),
            cmd("close", file="test_file"),
            cmd("sha1", file="test_file"),
            cmd("sha256", file="test_file"),
            cmd("upgrade", file="test_file", installer="upgrade.sh"),
            cmd("no_such_command"),
        ):
            assert await agent.send(message) == DISABLED
        assert not (config.incoming_dir / "test_file").exists()

    drive(config, via, scenario, allowed=False)


def test_c096_disabled_module_refuses_even_clear(home: Path, via: str) -> None:
    config = make_config(home, enabled=False)
    config.result_file.write_text("0")

    async def scenario(agent: Agent) -> None:
        assert await agent.send(cmd("clear_upgrade_result")) == DISABLED
        assert config.result_file.exists()
        assert await agent.send(cmd("open", mode="w", file="test_file")) == DISABLED

    drive(config, via, scenario, allowed=False)


def test_c099_open_unsupported_mode_closes_previous(
    home: Path, via: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(home)

    async def scenario(agent: Agent) -> None:
        assert await agent.send(cmd("open", mode="wb", file="existent_path")) == OK
        with caplog.at_level(logging.WARNING, logger="wpk_upgrade.agent.commands"):
            reply = await agent.send(cmd("open", mode="r", file="test_file"))
        assert reply == answer(4, "Unsupported file mode")
        assert "At open: File" in caplog.text and "existent_path' was opened. Closing." in (
            caplog.text
        )
        assert agent.handler.open_file is None
        write = cmd("write", file="existent_path", buffer="QUJD", length=3)
        assert await agent.send(write) == NOT_OPENED

    drive(config, via, scenario)


BAD_NAMES = ["../etc/passwd", "..", "a/b", "/etc/passwd", "x\0y", "", ".", "a\\b", "..hidden"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_c100_file_names_are_jailed(home: Path, via: str, name: str) -> None:
    config = make_config(home)

    async def scenario(agent: Agent) -> None:
        assert await agent.send(cmd("open", mode="w", file=name)) == BAD_NAME
        assert await agent.send(cmd("open", mode="w", file="good")) == OK
        for message in (
            cmd("write", file=name, buffer="QUJD", length=3),
            cmd("close", file=name),
            cmd("sha1", file=name),
            cmd("sha256", file=name),
            cmd("upgrade", file=name, installer="upgrade.sh"),
        ):
            assert await agent.send(message) == BAD_NAME, message
        assert sorted(p.name for p in config.incoming_dir.iterdir()) == ["good"]

    drive(config, via, scenario)


def test_c101_open_fails_at_os_level(home: Path, via: str) -> None:
    config = make_config(home)
    config.incoming_dir.rmdir()

    async def scenario(agent: Agent) -> None:
        reply = await agent.send(cmd("open", mode="w", file="test_file"))
        assert reply == answer(6, "File Open Error: No such file or directory")
        assert agent.handler.open_file is None

    drive(config, via, scenario)


def test_open_does_not_follow_symlinks(home: Path, via: str) -> None:
    config = make_config(home)
    victim = home / "etc" / "important"
    victim.write_text("keep me")
    (config.incoming_dir / "agent.wpk").symlink_to(victim)

    async def scenario(agent: Agent) -> None:
        reply = await agent.send(cmd("open", mode="wb", file="agent.wpk"))
        assert reply == answer(6, "File Open Error: Too many levels of symbolic links")

    drive(config, via, scenario)
    assert victim.read_text() == "keep me"


def test_c102_open_succeeds(home: Path, via: str) -> None:
    config = make_config(home)
    target = config.incoming_dir / "test_file"
    target.write_bytes(b"old partial content")

    async def scenario(agent: Agent) -> None:
        assert await agent.send(cmd("open", mode="w", file="test_file")) == OK
        assert agent.handler.open_file == "test_file"
        assert target.exists() and target.stat().st_size == 0  # truncated, as after §8.5

    drive(config, via, scenario)


def test_c104_write_to_other_file(home: Path, via: str) -> None:
    config = make_config(home)

    async def scenario(agent: Agent) -> None:
        assert await agent.send(cmd("open", mode="w", file="test_file_different")) == OK
        reply = await agent.send(cmd("write", file="test_file", buffer="ABCDABCD", length=8))
        assert reply == answer(9, "The target file doesn't match the opened file")
        reply = await agent.send(cmd("close", file="test_file"))
        assert reply == answer(9, "The target file doesn't match the opened file")

    drive(config, via, scenario)


_C105_SCRIPT = """
import asyncio, json, sys
from wpk_upgrade.agent.commands import CommandHandler
from wpk_upgrade.agent.config import load_agent_config
from wpk_upgrade.agent.result import UpgradeGate

async def main():
    handler = CommandHandler(load_agent_config(sys.argv[1]), UpgradeGate(True))
    for request in sys.argv[2:]:
        print(await handler.handle("upgrade", request), flush=True)

asyncio.run(main())
"""

FSIZE_LIMIT = 1024


def _limit_file_size() -> None:
    """preexec_fn: regular files may not grow past FSIZE_LIMIT bytes; EFBIG, not SIGXFSZ."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, resource.RLIM_INFINITY))


def write_config_file(home: Path, extra: str = "") -> Path:
    path = home / "etc" / "agent.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'home = "{home}"\n[agent]\nid = 5\nname = "web-01"\n{extra}')
    return path


def test_c105_write_fails(home: Path, via: str) -> None:
    """A real failed write(2): the agent runs in a child process whose RLIMIT_FSIZE is 1 KiB, so
    writing 2000 bytes stops with EFBIG (the same errno class as a full disk)."""
    config = make_config(home)
    config_path = write_config_file(home)
    chunk = os.urandom(2000)
    write = cmd("write", file="test_file", buffer=base64.b64encode(chunk).decode(), length=2000)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    requests = [cmd("open", mode="wb", file="test_file"), write]
    if via == "handler":
        proc = subprocess.run(
            [sys.executable, "-c", _C105_SCRIPT, str(config_path)]
            + [json.dumps(r) for r in requests],
            capture_output=True,
            text=True,
            env=env,
            preexec_fn=_limit_file_size,
            timeout=60,
            check=True,
        )
        replies = [json.loads(line) for line in proc.stdout.splitlines()]
        assert "At write: Cannot write on" in proc.stderr
    else:
        config.result_file.write_text("0")  # so that clear_upgrade_result opens the gate
        agent = subprocess.Popen(
            [sys.executable, "-m", "wpk_upgrade.agent", "--config", str(config_path)],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=_limit_file_size,
        )
        try:
            wait_for_socket(config.socket_path)
            sock = str(config.socket_path)
            clear = json.dumps(cmd("clear_upgrade_result")).encode()
            assert json.loads(request_unix(sock, clear)) == OK
            replies = [json.loads(request_unix(sock, json.dumps(r).encode())) for r in requests]
        finally:
            agent.send_signal(signal.SIGTERM)
            _, stderr = agent.communicate(timeout=30)
        assert agent.returncode == 0
        assert "At write: Cannot write on" in stderr
    assert replies == [OK, CANNOT_WRITE]
    assert (config.incoming_dir / "test_file").stat().st_size == FSIZE_LIMIT


def wait_for_socket(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_socket():
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear within {timeout} s")


def test_c106_write_succeeds(home: Path, via: str) -> None:
    config = make_config(home)

    async def scenario(agent: Agent) -> None:
        assert await agent.send(cmd("open", mode="w", file="test_file")) == OK
        assert await agent.send(cmd("write", file="test_file", buffer="ABCDABCD", length=6)) == OK
        data = bytes(range(256)) * 100
        write = cmd("write", file="test_file", buffer=base64.b64encode(data).decode(), length=25600)
        assert await agent.send(write) == OK
        assert await agent.send(cmd("close", file="test_file")) == OK
        content = (config.incoming_dir / "test_file").read_bytes()
        assert content == base64.b64decode("ABCDABCD") + data

    drive(config, via, scenario)


def test_c106_length_must_match_decoded_buffer(home: Path, via: str) -> None:
    """C106's literal input ("ABCDABCD", length 8) decodes to 6 bytes. The reference would write
    2 bytes read past its buffer (its unit test mocks fwrite); we refuse with 10 instead of
    writing garbage, and nothing is written."""
    config = make_config(home)

    async def scenario(agent: Agent) -> None:
        assert await agent.send(cmd("open", mode="w", file="test_file")) == OK
        reply = await agent.send(cmd("write", file="test_file", buffer="ABCDABCD", length=8))
        assert reply == CANNOT_WRITE
        reply = await agent.send(cmd("write", file="test_file", buffer="not base64!", length=3))
        assert reply == CANNOT_WRITE
        assert (config.incoming_dir / "test_file").stat().st_size == 0

    drive(config, via, scenario)


def test_c107_close_without_open(home: Path, via: str) -> None:
    config = make_config(home)

    async def scenario(agent: Agent) -> None:
        assert await agent.send(cmd("close", file="test_file")) == answer(8, "No file opened")
        write = cmd("write", file="test_file", buffer="QUJD", length=3)
        assert await agent.send(write) == NOT_OPENED

    drive(config, via, scenario)


def test_c109_sha1_and_sha256(home: Path, via: str) -> None:
    config = make_config(home)
    content = b"wpk bytes " * 1000
    (config.incoming_dir / "test_file").write_bytes(content)

    async def scenario(agent: Agent) -> None:
        reply = await agent.send(cmd("sha1", file="test_file"))
        assert reply == answer(0, hashlib.sha1(content).hexdigest())
        reply = await agent.send(cmd("sha256", file="test_file"))
        assert reply == answer(0, hashlib.sha256(content).hexdigest())
        reply = await agent.send(cmd("sha1", file="missing"))
        assert reply == answer(12, "Cannot generate SHA1")
        reply = await agent.send(cmd("sha256", file="missing"))
        assert reply == answer(12, "Cannot generate SHA256")
        assert await agent.send(cmd("sha1", file="../test_file")) == BAD_NAME

    drive(config, via, scenario)


def test_c109_sha1_after_transfer_without_close(home: Path, via: str) -> None:
    config = make_config(home)

    async def scenario(agent: Agent) -> None:
        assert await agent.send(cmd("open", mode="wb", file="f")) == OK
        assert await agent.send(cmd("write", file="f", buffer="QUJD", length=3)) == OK
        reply = await agent.send(cmd("sha1", file="f"))
        assert reply == answer(0, hashlib.sha1(b"ABC").hexdigest())

    drive(config, via, scenario)


# --------------------------------------------------------------------------- malformed requests


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        ("not json", NOT_FOUND),
        ("[1, 2]", NOT_FOUND),
        ('{"parameters": {}}', NOT_FOUND),
        ('{"command": 7, "parameters": {}}', NOT_FOUND),
        ('{"command": "open"}', REQUIRED),
        ('{"command": "open", "parameters": []}', REQUIRED),
        ('{"command": "nope", "parameters": {}}', NOT_FOUND),
        (cmd("open", file="f"), REQUIRED),
        (cmd("open", mode="w"), REQUIRED),
        (cmd("open", mode="w", file=3), REQUIRED),
        (cmd("write", file="f", length=3), REQUIRED),  # the reference crashes here (§11.13)
        (cmd("write", file="f", buffer="QUJD"), REQUIRED),
        (cmd("write", file="f", buffer="QUJD", length="3"), REQUIRED),
        (cmd("write", file="f", buffer="QUJD", length=True), REQUIRED),
        (cmd("write", file="f", buffer="QUJD", length=-1), REQUIRED),
        (cmd("close"), REQUIRED),
        (cmd("sha1"), REQUIRED),
        (cmd("upgrade"), REQUIRED),
        (cmd("upgrade", file="f", installer=["x"]), REQUIRED),
        ("[" * 30000 + "]" * 30000, NOT_FOUND),
    ],
)
def test_malformed_requests_get_coded_replies(
    home: Path, via: str, request_: Any, expected: dict[str, Any]
) -> None:
    config = make_config(home, enabled=True)

    async def scenario(agent: Agent) -> None:
        assert await agent.send(request_) == expected
        # the handler keeps working
        assert await agent.send(cmd("open", mode="w", file="after")) == OK

    drive(config, via, scenario)


def test_reply_is_compact_json(home: Path) -> None:
    config = make_config(home)

    async def scenario(agent: Agent) -> None:
        text = await agent.send_raw(cmd("close", file="x"))
        assert text == '{"error":8,"message":"No file opened","data":[]}'

    drive(config, "handler", scenario)


# --------------------------------------------------------------------------- C117: restart


def test_c117_write_after_agent_restart_is_refused(home: Path) -> None:
    """open, then the connection drops and the agent restarts (a new handler, empty memory):
    the next write is refused with 7, so the manager fails the task (reference §8.6)."""
    config = make_config(home)

    async def before(agent: Agent) -> None:
        assert await agent.send(cmd("open", mode="wb", file="agent.wpk")) == OK
        assert await agent.send(cmd("write", file="agent.wpk", buffer="QUJD", length=3)) == OK

    async def after(agent: Agent) -> None:
        assert await agent.send(cmd("write", file="agent.wpk", buffer="QUJD", length=3)) == (
            NOT_OPENED
        )
        assert await agent.send(cmd("close", file="agent.wpk")) == answer(8, "No file opened")

    drive(config, "socket", before)
    drive(config, "socket", after)


# --------------------------------------------------------------------------- legacy com target


def legacy(config: AgentConfig, *payloads: str, allowed: bool = True) -> list[str]:
    async def main() -> list[str]:
        handler = CommandHandler(config, UpgradeGate(allowed), RestartLock())
        try:
            return [await handler.handle("com", p) for p in payloads]
        finally:
            handler.close_all()

    return asyncio.run(main())


def test_legacy_lock_restart(home: Path) -> None:
    config = make_config(home, max_restart_lock="600s")

    async def main() -> None:
        lock = RestartLock()
        handler = CommandHandler(config, UpgradeGate(False), lock)
        assert await handler.handle("com", "lock_restart -1") == "ok "
        assert 599 < lock.remaining() <= 600
        assert await handler.handle("com", "lock_restart 5000") == "ok "
        assert 599 < lock.remaining() <= 600
        assert await handler.handle("com", "lock_restart 30") == "ok "
        assert 29 < lock.remaining() <= 30
        assert await handler.handle("com", "lock_restart -2") == "err Invalid timeout"
        assert await handler.handle("com", "lock_restart soon") == "err Invalid timeout"
        assert await handler.handle("com", "lock_restart") == (
            "err WCOM lock_restart needs arguments"
        )
        assert await handler.handle("com", "lock_restart 0") == "ok "
        assert lock.remaining() == 0

    asyncio.run(main())


def test_legacy_unknown_and_gate(home: Path) -> None:
    config = make_config(home)
    assert legacy(config, "restart", "open wb f", allowed=False) == [
        "err Unrecognized command",
        "err Upgrade module is disabled or not ready yet",
    ]


def test_legacy_transfer_with_raw_bytes(home: Path) -> None:
    config = make_config(home)
    data = bytes(range(256)) + b" spaces  and\nnewlines "
    as_text = data.decode("latin-1")  # how transfer.py carries raw bytes
    replies = legacy(
        config,
        "open wb legacy.wpk",
        f"write {len(data)} legacy.wpk {as_text}",
        "write 0 legacy.wpk ",
        "close legacy.wpk",
        "sha1 legacy.wpk",
    )
    assert replies == ["ok ", "ok ", "ok ", "ok ", f"ok {hashlib.sha1(data).hexdigest()}"]
    assert (config.incoming_dir / "legacy.wpk").read_bytes() == data


def test_legacy_errors(home: Path) -> None:
    config = make_config(home)
    config.result_file.write_text("2")
    replies = legacy(
        config,
        "open",
        "open r f",
        "open wb ../f",
        "write 3 f abc",
        "close f",
        "open wb f",
        "write 3 g abc",
        "write 10 f abc",
        "write x f abc",
        "close g",
        "sha1 missing",
        "upgrade ../f upgrade.sh",
        "upgrade_result",
    )
    assert replies == [
        "err WCOM open needs arguments",
        "err Unsupported mode",
        "err Invalid file name",
        "err File not opened. Agent might have been auto-restarted during upgrade",
        "err No file opened",
        "ok ",
        "err The target file doesn't match the opened file",
        "err Write file",
        "err WCOM write needs arguments",
        "err The target file doesn't match the opened file",
        "err Cannot generate SHA1",
        "err Invalid file name",
        "ok 2",
    ]
    config.result_file.unlink()
    assert legacy(config, "upgrade_result") == ["err Cannot read upgrade_result file."]
    shutil.rmtree(config.incoming_dir)
    assert legacy(config, "open wb f") == ["err No such file or directory"]


# --------------------------------------------------------------------------- upgrade (C111, C116)


@dataclass(frozen=True)
class Lab:
    """A lab CA, a code-signing certificate it issued, and an unrelated CA."""

    ca: Path
    signer_cert: Path
    signer_key: Path
    other_ca: Path
    self_signed_cert: Path
    self_signed_key: Path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    root = tmp_path_factory.mktemp("lab")
    ca = pki.create_ca(root / "ca")
    signer = pki.issue_certificate(ca.cert, ca.key, root / "signer", "wpk signer", "code")
    other = pki.create_ca(root / "other", common_name="someone else")
    rogue = pki.create_ca(root / "rogue", common_name="self-signed signer")
    return Lab(ca.cert, signer.cert, signer.key, other.cert, rogue.cert, rogue.key)


def upgrade_config(home: Path, lab: Lab, **upgrade: Any) -> AgentConfig:
    config = make_config(home, installer_timeout=upgrade.pop("installer_timeout", 10), **upgrade)
    shutil.copy(lab.ca, config.etc_dir / "wpk_root.pem")
    return config


def build_wpk(
    config: AgentConfig, lab: Lab, files: dict[str, str], name: str = "agent.wpk"
) -> Path:
    """Pack ``files`` (name -> text; names ending in .sh are made executable) into a WPK."""
    src = Path(tempfile.mkdtemp(prefix="wpk-src-"))
    try:
        paths = []
        for member, text in files.items():
            path = src / member
            path.write_text(text)
            paths.append(path)
        out = config.incoming_dir / name
        wpk.pack(out, lab.signer_cert, lab.signer_key, paths)
        return out
    finally:
        shutil.rmtree(src)


def signed_raw(config: AgentConfig, cert: Path, key: Path, payload: bytes, name: str) -> Path:
    """A WPK256 file around an arbitrary (already compressed) payload, correctly signed."""
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    signature = private.sign(payload, padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr,call-arg]
    out = config.incoming_dir / name
    out.write_bytes(b"WPK256\0" + cert.read_bytes() + b"\0" + signature + payload)
    return out


INSTALLER_OK = """#!/bin/sh
echo "installing from $PWD"
printf '%s\\n' "$WPK_AGENT_HOME" "$WPK_AGENT_PID" "$WPK_AGENT_CONFIG" > "$WPK_AGENT_HOME/env.txt"
cp payload.txt "$WPK_AGENT_HOME/etc/version"
exit 0
"""


def test_upgrade_succeeds_with_real_signed_wpk(home: Path, via: str, lab: Lab) -> None:
    config = upgrade_config(home, lab)
    config.result_file.write_text("2")  # an old result: removed by the unpack step
    wpk_path = build_wpk(config, lab, {"upgrade.sh": INSTALLER_OK, "payload.txt": "v4.9.1\n"})
    sha1 = hashlib.sha1(wpk_path.read_bytes()).hexdigest()

    async def scenario(agent: Agent) -> None:
        assert await agent.send(cmd("sha1", file="agent.wpk")) == answer(0, sha1)
        reply = await agent.send(cmd("upgrade", file="agent.wpk", installer="upgrade.sh"))
        assert reply == answer(0, "0")

    drive(config, via, scenario)
    assert (config.etc_dir / "version").read_text() == "v4.9.1\n"
    home_line, pid_line, config_line = (home / "env.txt").read_text().splitlines()
    assert home_line == str(config.home) and pid_line == str(os.getpid())
    assert config_line == ""  # loaded with load_data, so there is no config file path
    assert not config.result_file.exists()
    assert not wpk_path.exists()  # removed once unpacked (reference §11.14, fixed)
    assert oct((config.upgrade_dir / "upgrade.sh").stat().st_mode & 0o777) == "0o750"


def test_upgrade_default_installer_and_exit_status(home: Path, via: str, lab: Lab) -> None:
    config = upgrade_config(home, lab)
    build_wpk(config, lab, {"upgrade.sh": "#!/bin/sh\nexit 3\n"})

    async def scenario(agent: Agent) -> None:
        assert await agent.send(cmd("upgrade", file="agent.wpk")) == answer(0, "3")

    drive(config, via, scenario)


def test_c116_non_existent_installer(home: Path, via: str, lab: Lab) -> None:
    config = upgrade_config(home, lab)
    build_wpk(config, lab, {"upgrade.sh": INSTALLER_OK, "payload.txt": "v4.9.1\n"})

    async def scenario(agent: Agent) -> None:
        reply = await agent.send(cmd("upgrade", file="agent.wpk", installer="fake_upgrade.sh"))
        assert reply == answer(17, "Could not chmod")

    drive(config, via, scenario)
    assert not (config.etc_dir / "version").exists()


def test_c111_installer_name_escapes_jail(home: Path, via: str, lab: Lab) -> None:
    config = upgrade_config(home, lab)
    build_wpk(config, lab, {"upgrade.sh": INSTALLER_OK, "payload.txt": "v"})

    async def scenario(agent: Agent) -> None:
        for installer in ("../x", "/bin/sh", "a/../../x"):
            reply = await agent.send(cmd("upgrade", file="agent.wpk", installer=installer))
            assert reply == BAD_NAME, installer

    drive(config, via, scenario)


def test_c111_exec_fails(home: Path, via: str, lab: Lab) -> None:
    config = upgrade_config(home, lab)
    # No interpreter line: execve() fails with ENOEXEC.
    build_wpk(config, lab, {"install.sh": "this is not a program\n"})

    async def scenario(agent: Agent) -> None:
        reply = await agent.send(cmd("upgrade", file="agent.wpk", installer="install.sh"))
        assert reply == answer(18, "Error executing command")

    drive(config, via, scenario)


def test_c111_installer_timeout_kills_the_process_group(home: Path, via: str, lab: Lab) -> None:
    config = upgrade_config(home, lab, installer_timeout=1)
    slow = '#!/bin/sh\nsleep 60 &\necho $! > "$WPK_AGENT_HOME/child.pid"\nsleep 60\n'
    build_wpk(config, lab, {"upgrade.sh": slow})

    async def scenario(agent: Agent) -> None:
        started = time.monotonic()
        reply = await agent.send(cmd("upgrade", file="agent.wpk", installer="upgrade.sh"))
        assert reply == answer(18, "Error executing command")
        assert time.monotonic() - started < 10

    drive(config, via, scenario)
    child = int((home / "child.pid").read_text())
    assert not _alive(child), "the installer's background child survived the timeout"


def _alive(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # a killed child of the (dead) installer is reaped by init; it may linger as a zombie
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().split(") ", 1)[1].startswith("Z"):
                    return False
        except FileNotFoundError:
            return False
        time.sleep(0.05)
    return True


def test_c111_unknown_ca(home: Path, via: str, lab: Lab) -> None:
    config = upgrade_config(home, lab)
    shutil.copy(lab.other_ca, config.etc_dir / "wpk_root.pem")
    build_wpk(config, lab, {"upgrade.sh": INSTALLER_OK, "payload.txt": "v"})

    async def scenario(agent: Agent) -> None:
        reply = await agent.send(cmd("upgrade", file="agent.wpk", installer="upgrade.sh"))
        assert reply == answer(13, "Could not verify signature")

    drive(config, via, scenario)
    assert not (config.etc_dir / "version").exists()


def test_ca_verification_disabled(
    home: Path, via: str, lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    """Disabled CA checks: a self-signed signer passes (the signature is still checked), with a
    loud warning on every upgrade."""
    config = upgrade_config(home, lab, ca_verification={"enabled": False})
    script = b"#!/bin/sh\necho hi\nexit 0\n"
    payload = gzip.compress(b"!%d upgrade.sh\n%s" % (len(script), script))
    signed_raw(config, lab.self_signed_cert, lab.self_signed_key, payload, "agent.wpk")

    async def scenario(agent: Agent) -> None:
        with caplog.at_level(logging.WARNING):
            reply = await agent.send(cmd("upgrade", file="agent.wpk", installer="upgrade.sh"))
        assert reply == answer(0, "0")

    drive(config, via, scenario)
    assert "WPK verification with CA is disabled" in caplog.text


def test_c111_bad_signature(home: Path, via: str, lab: Lab) -> None:
    config = upgrade_config(home, lab)
    path = build_wpk(config, lab, {"upgrade.sh": INSTALLER_OK, "payload.txt": "v"})
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))

    async def scenario(agent: Agent) -> None:
        reply = await agent.send(cmd("upgrade", file="agent.wpk", installer="upgrade.sh"))
        assert reply == answer(13, "Could not verify signature")
        reply = await agent.send(cmd("upgrade", file="missing.wpk", installer="upgrade.sh"))
        assert reply == answer(13, "Could not verify signature")

    drive(config, via, scenario)


def test_c111_decompress_fails(home: Path, via: str, lab: Lab) -> None:
    config = upgrade_config(home, lab)
    corrupt = gzip.compress(b"!3 upgrade.sh\nabc")[:-6] + b"garbage!"
    signed_raw(config, lab.signer_cert, lab.signer_key, corrupt, "agent.wpk")

    async def scenario(agent: Agent) -> None:
        reply = await agent.send(cmd("upgrade", file="agent.wpk", installer="upgrade.sh"))
        assert reply == answer(14, "Could not uncompress package")

    drive(config, via, scenario)


def test_c111_unmerge_fails(home: Path, via: str, lab: Lab) -> None:
    config = upgrade_config(home, lab)
    payload = gzip.compress(b"!3 ../escape.sh\nabc")
    signed_raw(config, lab.signer_cert, lab.signer_key, payload, "agent.wpk")

    async def scenario(agent: Agent) -> None:
        reply = await agent.send(cmd("upgrade", file="agent.wpk", installer="escape.sh"))
        assert reply == answer(16, "Error unmerging file")

    drive(config, via, scenario)
    assert not (config.home / "var" / "escape.sh").exists()


def test_c111_clean_upgrade_dir_fails(home: Path, via: str, lab: Lab) -> None:
    config = upgrade_config(home, lab)
    build_wpk(config, lab, {"upgrade.sh": INSTALLER_OK, "payload.txt": "v"})
    shutil.rmtree(config.upgrade_dir)
    config.upgrade_dir.write_text("a file where the upgrade directory should be")

    async def scenario(agent: Agent) -> None:
        reply = await agent.send(cmd("upgrade", file="agent.wpk", installer="upgrade.sh"))
        assert reply == answer(15, "Could not clean up upgrade directory")

    drive(config, via, scenario)


def test_legacy_upgrade(home: Path, lab: Lab) -> None:
    config = upgrade_config(home, lab)
    build_wpk(config, lab, {"upgrade.sh": INSTALLER_OK, "payload.txt": "v4.0.1"})
    (reply,) = legacy(config, "upgrade agent.wpk upgrade.sh")
    assert reply == f"ok 0 installing from {config.upgrade_dir}\n"
    assert (config.etc_dir / "version").read_text() == "v4.0.1"
    build_wpk(config, lab, {"upgrade.sh": INSTALLER_OK, "payload.txt": "v4.0.1"})
    assert legacy(config, "upgrade agent.wpk ../x", "upgrade agent.wpk nope.sh") == [
        "err Invalid installer name",
        "err Could not chmod",
    ]
