"""Regression tests for the faults the hardening measurements found (one test per kind).

* deep JSON nesting raised ``RecursionError`` out of the socket handlers (no reply, asyncio
  "Unhandled exception") on the manager sockets and the tcp transport;
* lone surrogates (``\\ud800``) and NUL reached the store and file-system calls (tracebacks,
  "Database error", an event task dying without its reply);
* peer-supplied text was logged whole (a 1 MiB line per message) and one request naming
  10,000 agents logged 10,000 lines;
* an exception escaping a socket handler left the client without an answer;
* the HTTP source retried a malformed URL for 30 s (``InvalidURL`` taken as transient);
* admin integers beyond 64 bits crashed the store query;
* a 65,000-character ``file_path``/``version`` (or an agent's long answer) froze the manager's
  event loop for tens of seconds: the log redaction's URL pattern was quadratic on a long run of
  letters, and the text was logged and stored whole.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from hardlib import HEADER, exchange, frame, parse_reply

from wpk_upgrade.agent.commands import CommandHandler
from wpk_upgrade.agent.config import AgentConfigSchema
from wpk_upgrade.agent.result import UpgradeGate
from wpk_upgrade.config import load_data
from wpk_upgrade.errors import UpgradeCode, UpgradeError
from wpk_upgrade.models import AgentInfo
from wpk_upgrade.testing.harness import ManagerHarness
from wpk_upgrade.untrusted import LogBudget, clip, clip_text, loads

DEEP = b"[" * 60000


def ubuntu_agent(agent_id: int) -> AgentInfo:
    """A v4.8.0 Ubuntu agent (upgradable by ``upgrade_custom``)."""
    return AgentInfo(
        agent_id=agent_id,
        version="v4.8.0",
        os_platform="ubuntu",
        os_major="22",
        os_minor="04",
        os_arch="x86_64",
    )
NUL = json.dumps({"origin": {"module": "api", "name": "a\x00"}, "command": "upgrade_result"})


# --------------------------------------------------------------------------- untrusted.loads


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (DEEP, "nested deeper"),
        (b'{"a":' * 5000 + b"1" + b"}" * 5000, "nested deeper"),
        (b"[" * 65 + b"]" * 65, "nested deeper"),
        (b'"\\ud800"', "surrogate"),
        (b'{"\\udfff": 1}', "surrogate"),
        (b'["a\\u0000b"]', "NUL"),
        (b"\xff", "utf-8"),
    ],
)
def test_loads_refuses_what_nothing_downstream_can_take(raw: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        loads(raw)


def test_loads_accepts_normal_input_and_nul_when_asked() -> None:
    assert loads(b"[" * 64 + b"]" * 64) is not None
    assert loads(b'"\\ud83d\\ude00"') == "\U0001f600"  # a surrogate pair is one character
    assert loads(b'"a\\u0000"', nul=True) == "a\x00"  # legacy payloads carry raw bytes


def test_clip_and_budget() -> None:
    assert clip("x" * 10) == repr("x" * 10)
    assert len(clip("x" * 1_000_000)) < 200 and "1000002 characters" in clip("x" * 1_000_000)
    assert len(clip_text("y" * 100_000)) < 500
    budget = LogBudget(3)
    assert [budget.take() for _ in range(5)] == [True, True, True, False, False]
    assert budget.skipped == 2


# --------------------------------------------------------------------------- manager sockets


def _send(path: Path, payload: bytes) -> Any:
    return parse_reply(exchange(path, frame(payload)))


def test_manager_sockets_answer_hostile_json_with_coded_errors(
    harness: ManagerHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    cases = [
        DEEP,
        b'{"command":"upgrade","parameters":{"agents":' + b"[" * 60000,
        json.dumps(
            {"command": "upgrade", "parameters": {"agents": [1], "version": "\ud800"}}
        ).encode(),
        NUL.encode(),
    ]
    for which, path in (
        ("upgrade", harness.config.upgrade_socket),
        ("task", harness.config.task_socket),
    ):
        for payload in cases:
            reply = _send(path, payload)
            assert reply["error"] == 1 and reply["data"][0]["error"] == 1, (which, reply)
    text = caplog.text
    assert "Unhandled exception" not in text and "Traceback" not in text
    assert "RecursionError" not in text and "UnicodeEncodeError" not in text


@pytest.mark.parametrize("size", [0xFFFFFFFF, 70 << 20])
def test_frames_announcing_more_than_can_be_read_get_a_coded_answer(
    harness: ManagerHarness, size: int
) -> None:
    """A length prefix of 4 GiB (or 70 MiB, over what is read through) was answered by
    closing the connection; now both sockets answer it with the coded error and a detail."""
    import struct

    for path in (harness.config.upgrade_socket, harness.config.task_socket):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(20)
            sock.connect(str(path))
            sock.sendall(struct.pack("<I", size) + b"{}")
            sock.shutdown(socket.SHUT_WR)
            reply = _read_frame(sock)
        assert reply["error"] != 0 and "exceeds the maximum" in reply.get("detail", ""), reply
    assert len(harness.result([1])) == 1  # and the next request is served


def test_a_failing_handler_still_answers(
    harness: ManagerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(raw: bytes) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr("wpk_upgrade.service.parse_upgrade_request", broken)
    reply = _send(harness.config.upgrade_socket, b"{}")
    assert reply["error"] == 1 and reply["detail"] == "the request could not be served"


def test_one_request_naming_many_agents_logs_a_few_lines(
    harness: ManagerHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    agents = list(range(1, 1501))
    for message in (
        {"command": "upgrade", "parameters": {"agents": agents}},
        {"command": "upgrade_update_status", "parameters": {"agents": agents, "status": "Done"}},
    ):
        caplog.clear()
        reply = harness.upgrade(message)
        assert len(reply["data"]) == 1500
        lines = [r for r in caplog.records if r.name == "wpk_upgrade.service"]
        assert len(lines) <= 15, len(lines)
        assert "1490 more" in caplog.text


def test_admin_integers_beyond_64_bits_are_refused(
    harness: ManagerHarness, caplog: pytest.LogCaptureFixture
) -> None:
    for params in ({"task_id": 2**70}, {"limit": 10**30}):
        command = "task_history" if "task_id" in params else "tasks_list"
        reply = harness.task({"command": command, "parameters": params})
        assert reply["error"] != 0 or reply["data"] == [], reply
    assert "Traceback" not in caplog.text and "OverflowError" not in caplog.text


# --------------------------------------------------------------------------- transport


def _read_frame(sock: socket.socket) -> Any:
    head = b""
    while len(head) < 4:
        chunk = sock.recv(4 - len(head))
        if not chunk:
            return None
        head += chunk
    (size,) = HEADER.unpack(head)
    body = b""
    while len(body) < size:
        chunk = sock.recv(size - len(body))
        if not chunk:
            return None
        body += chunk
    return json.loads(body)


def _connect(harness: ManagerHarness, agent_id: int = 40) -> socket.socket:
    host, port = harness.transport_address.split(":")
    sock = socket.create_connection((host, int(port)), 10)
    sock.settimeout(10)
    hello = {"type": "hello", "agent": {"id": agent_id, "name": "r"}, "features": []}
    sock.sendall(frame(json.dumps(hello).encode()))
    assert _read_frame(sock) == {"type": "welcome"}
    return sock


def test_transport_refuses_deep_and_surrogate_frames_without_crashing(
    harness: ManagerHarness, caplog: pytest.LogCaptureFixture
) -> None:
    host, port = harness.transport_address.split(":")
    with socket.create_connection((host, int(port)), 10) as sock:
        sock.settimeout(10)
        sock.sendall(frame(DEEP))
        answer = _read_frame(sock)
        assert answer is not None and answer["type"] == "refused"
    with _connect(harness) as sock:
        event = {"type": "event", "id": 1, "message": {"command": "upgrade_update_status"}}
        raw = json.dumps(event).encode().replace(b"upgrade_update_status", b"\\ud800")
        sock.sendall(frame(raw))
        assert _read_frame(sock) is None  # the whole frame is refused: connection closed
    with _connect(harness) as sock:
        sock.sendall(frame(b'{"type":"event","id":2,"message":' + b"[" * 60000))
        assert _read_frame(sock) is None
    assert "Unhandled exception" not in caplog.text
    assert "Task exception was never retrieved" not in caplog.text


def test_transport_event_failure_still_gets_a_reply_and_logs_are_clipped(
    harness: ManagerHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    assert harness.manager is not None

    async def broken(agent_id: int, message: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("boom")

    with _connect(harness) as sock:
        # peer text is clipped in the log
        huge = {"type": "event", "id": 1, "message": {"command": "x" * 500_000}}
        sock.sendall(frame(json.dumps(huge).encode()))
        reply = _read_frame(sock)
        assert reply["type"] == "event_reply" and reply["reply"]["error"] == 3
        sock.sendall(frame(json.dumps({"type": "y" * 500_000}).encode()))
        sock.sendall(frame(b'{"type":"ping"}'))
        assert _read_frame(sock) == {"type": "pong"}
        harness.manager.hub.agent_event = broken  # type: ignore[method-assign]
        sock.sendall(frame(b'{"type":"event","id":5,"message":{}}'))
        reply = _read_frame(sock)
        assert reply["id"] == 5
        assert reply["reply"]["error"] == UpgradeCode.TASK_MANAGER_COMMUNICATION
    assert max(len(r.getMessage()) for r in caplog.records) < 2000


# --------------------------------------------------------------------------- agent


def test_agent_refuses_surrogates_and_clips_its_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_data({"home": str(tmp_path), "agent": {"id": 5}}, AgentConfigSchema(), "test")
    for directory in config.layout_dirs():
        directory.mkdir(parents=True, exist_ok=True)
    handler = CommandHandler(config, UpgradeGate(True))

    async def ask(payload: str) -> dict[str, Any]:
        return json.loads(await handler.handle("upgrade", payload))

    async def main() -> None:
        reply = await ask('{"command":"open","parameters":{"mode":"wb","file":"\\ud800"}}')
        assert reply["error"] == 2
        reply = await ask(json.dumps({"command": "z" * 60000, "parameters": {}}))
        assert reply["error"] == 2
        reply = await ask(json.dumps({"command": "sha1", "parameters": {"file": "a" * 50000}}))
        assert reply["error"] in (5, 12)

    caplog.set_level(logging.INFO)
    asyncio.run(main())
    assert "Traceback" not in caplog.text
    assert max(len(r.getMessage()) for r in caplog.records) < 2000


# --------------------------------------------------------------------------- http source


def test_http_source_gives_up_at_once_on_a_malformed_url() -> None:
    from wpk_source_http.source import HttpRepositorySource

    started = time.monotonic()
    with pytest.raises(UpgradeError, match="invalid URL"):
        HttpRepositorySource().read_text("https://bad\x01host/versions", 1000)
    assert time.monotonic() - started < 2


# --------------------------------------------------------------------------- long peer text


def test_redaction_is_linear_and_lines_are_bounded() -> None:
    """1 MiB of letters (a quadratic pattern would take hours) is redacted in a child
    process within a minute; the formatted line is cut, the secret still masked."""
    import subprocess
    import sys

    code = (
        "import logging\n"
        "from wpk_upgrade.logging_setup import JsonFormatter, Redactor, TextFormatter\n"
        "r = Redactor(['tok-0123456789abcdef'])\n"
        "for text in ('a' * (1 << 20), 'a:' * (1 << 19), 'ab://' * (1 << 18)):\n"
        "    r(text)\n"
        "rec = logging.LogRecord('x', 20, 'f', 1, '%s', ('a' * 100000 + ' tok-0123456789abcdef',),"
        " None)\n"
        "for f in (TextFormatter(r), JsonFormatter(r)):\n"
        "    line = f.format(rec)\n"
        "    assert len(line) < 5000 and 'more characters cut' in line, len(line)\n"
        "rec = logging.LogRecord('x', 20, 'f', 1, '%s', ('a' * 4090 + ' tok-0123456789abcdef',),"
        " None)\n"
        "assert 'tok-' not in TextFormatter(r).format(rec)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr


def test_coded_error_details_are_cut() -> None:
    exc = UpgradeError(UpgradeCode.SEND_LOCK_RESTART_ERROR, "agent said: " + "a" * 100_000)
    assert len(exc.detail) < 1100 and exc.detail.endswith("more characters cut]")
    assert len(str(exc)) < 1200


def test_long_request_text_neither_freezes_nor_floods(
    harness: ManagerHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """A connected agent, then a 65,000-character ``file_path`` (the task is created and
    fails) and ``version``: answered, the stored reason is cut, no formatted line is longer
    than a few KB, and the socket keeps answering."""
    from wpk_upgrade.logging_setup import JsonFormatter, Redactor
    from wpk_upgrade.testing.harness import ScriptedAgent, json_agent

    caplog.set_level(logging.INFO)
    info = ubuntu_agent(91)
    long_path = "/tmp/" + "a" * 65000 + ".wpk"
    with ScriptedAgent(harness, info, json_agent()):
        reply = harness.upgrade(
            {"command": "upgrade_custom", "parameters": {"agents": [91], "file_path": long_path}}
        )
        assert reply["error"] == 0, reply
        harness.wait_for(lambda: harness.result([91])[0].get("status") == "Error")
        reply = harness.upgrade(
            {"command": "upgrade", "parameters": {"agents": [91], "version": "v4." + "9" * 65000}}
        )
        assert "error" in reply
    task_id = harness.result([91])[0]["task_id"]
    reasons = [h.reason or "" for h in harness.store.history(task_id)]
    assert reasons and max(len(r) for r in reasons) < 1200, [len(r) for r in reasons]
    fmt = JsonFormatter(Redactor())
    assert max(len(fmt.format(r)) for r in caplog.records) < 6000
    assert harness.result([91])[0]["status"] in ("Error", "In queue", "Updating")


# --------------------------------------------------------------------------- installer names


@pytest.mark.parametrize("installer", ["../x", "/bin/sh", "a/../../x.sh", "..\\x", "-rf"])
def test_upgrade_custom_installer_must_be_a_plain_name(
    harness: ManagerHarness, tmp_path: Path, installer: str, caplog: pytest.LogCaptureFixture
) -> None:
    """It was forwarded to the agent (which refused it only after the whole transfer)."""
    from wpk_upgrade.testing.harness import ScriptedAgent, json_agent

    package = tmp_path / "p.wpk"
    package.write_bytes(b"not even a WPK")
    info = ubuntu_agent(90)
    with ScriptedAgent(harness, info, json_agent()) as agent:
        reply = harness.upgrade(
            {
                "command": "upgrade_custom",
                "parameters": {"agents": [90], "file_path": str(package), "installer": installer},
            }
        )
        assert reply["error"] == 3 and "installer" in reply["data"][0]["message"], reply
        assert harness.result([90])[0]["error"] != 0  # no task was created
        assert agent.received == []
    assert "refused upgrade_custom" in caplog.text


# --------------------------------------------------------------------------- agent killed (R3)


CHILD = r"""
import os, sys
from pathlib import Path
from wpk_upgrade import wpk
real = os.rename
def rename(src, dst):
    if ".unpack-" in str(src):
        os._exit(9)  # killed between moving the old package aside and the new one in
    return real(src, dst)
os.rename = rename
wpk.verify_and_unpack(Path(sys.argv[1]), None, Path(sys.argv[2]), "upgrade.sh")
"""


def test_install_switch_never_leaves_a_partial_package(tmp_path: Path) -> None:
    """Killed inside the switch, the agent kept part of the old package (its directory was
    being emptied): now the old one is renamed aside whole, and leftovers are removed at the
    agent's next start (``wpk.remove_stale``)."""
    import subprocess
    import sys

    from hardlib import Lab, tree_snapshot

    from wpk_upgrade import wpk

    lab = Lab.create(tmp_path / "lab")
    new = lab.wpk(tmp_path / "new.wpk", {"upgrade.sh": b"#!/bin/sh\n", "n.bin": b"n" * 1000})
    dest = tmp_path / "var" / "upgrade"
    dest.mkdir(parents=True)
    for i in range(300):
        (dest / f"old{i}").write_text("old")
    old_state = tree_snapshot(dest)
    run = subprocess.run([sys.executable, "-c", CHILD, str(new), str(dest)], timeout=60)
    assert run.returncode == 9
    assert not dest.exists() or tree_snapshot(dest) == old_state  # never a mix
    leftovers = sorted(p.name for p in dest.parent.iterdir() if p.name != "upgrade")
    assert leftovers and all(".unpack-" in n or ".old-" in n for n in leftovers)
    assert sorted(wpk.remove_stale(dest)) == leftovers
    assert [p.name for p in dest.parent.iterdir() if p.name != "upgrade"] == []
    # and a normal switch: exactly the new package, nothing beside it
    dest.mkdir(exist_ok=True)
    (dest / "stale").write_text("x")
    wpk.verify_and_unpack(new, None, dest, "upgrade.sh")
    assert sorted(p.name for p in dest.iterdir()) == ["n.bin", "upgrade.sh"]
    assert [p.name for p in dest.parent.iterdir()] == ["upgrade"]
    assert oct(dest.stat().st_mode & 0o777) == "0o755"  # the old directory's mode is kept


class _Link:
    """A scripted agent link: ``answers`` maps a command to its replies, in turn."""

    def __init__(self, agent_id: int, answers: dict[str, list[Any]]) -> None:
        self.agent_id = agent_id
        self.answers = answers
        self.sent: list[str] = []

    async def request(self, target: str, payload: str, timeout: float) -> str:
        command = payload.split(" ", 1)[0] if target == "com" else json.loads(payload)["command"]
        self.sent.append(command)
        answer = self.answers[command].pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return str(answer)

    async def close(self) -> None:
        pass


def _ok(message: str) -> str:
    return json.dumps({"error": 0, "message": message, "data": []})


@pytest.mark.parametrize("still_there", [True, False])
def test_connection_lost_during_upgrade(still_there: bool) -> None:
    """Killed during ``upgrade``, the task was marked Error at once, even when its installer
    went on and succeeded. Now: the WPK still on the agent -> ``upgrade`` again; gone -> the
    installer may have run, the push ends ``UNKNOWN`` (the task waits for the report)."""
    from wpk_upgrade.models import WpkRef
    from wpk_upgrade.transfer import UNKNOWN, TransferSettings, WpkPusher

    sha1 = "ab" * 20
    first = _Link(7, {"upgrade": [ConnectionError("connection closed")]})
    not_ready = json.dumps({"error": 1, "message": "not ready", "data": []})
    gone = json.dumps({"error": 12, "message": "Cannot generate SHA1", "data": []})
    second = _Link(
        7,
        {
            "sha1": [not_ready, _ok(sha1.upper()) if still_there else gone],
            "lock_restart": ["ok "],
            "upgrade": [_ok("0")],
        },
    )

    async def reconnect(old: Any) -> Any:
        assert old is first
        return second

    settings = TransferSettings(resume_timeout=5, open_retry_delay=0.01)
    pusher = WpkPusher(first, "v4.8.0", settings, reconnect=reconnect)  # type: ignore[arg-type]
    ref = WpkRef(path="/nonexistent", file_name="a.wpk", sha1=sha1, size=1)
    status = asyncio.run(pusher._install(ref))
    if still_there:
        assert status == "0" and second.sent == ["sha1", "sha1", "lock_restart", "upgrade"]
    else:
        assert status == UNKNOWN and second.sent == ["sha1", "sha1"]
