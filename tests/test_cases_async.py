"""Black-box cases of category C (asynchronous upgrade outcome) through the real sockets.

Every test runs a real manager node (``ManagerHarness``: SQLite store, UNIX sockets, tcp
transport), simulated agents on the real transport (``ScriptedAgent`` answering with ``Sim``,
a script that behaves like a real agent's command handler and can stall or fail at any step),
and real signed WPKs in a reference-layout repository served over HTTPS on loopback (or read
through ``file://`` where the case is about something else). Outcomes are read back with
``upgrade_result`` on the task socket, as the cases do.

Where a case's expectation conflicts with DESIGN.md, the design wins and the test says so:
D10 (``status`` is the short word, the reference's sentence moves to ``error_msg``), D1 (the
default target is the newest version in the repository), D6 (an agent reports only about
itself) and D7 (timeout counted from Updating; a late report after Timeout is recorded).

``Sim`` and the helpers here are also used by ``test_cases_transfer.py``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from httpfixtures import RepoServer, TlsFiles, closed_port, make_tls
from shared_cases import case

from wpk_upgrade import pki, wpk
from wpk_upgrade.framing import HEADER
from wpk_upgrade.models import REFERENCE_STATUS_TEXT, AgentInfo, TaskStatus
from wpk_upgrade.testing.harness import ManagerHarness, ScriptedAgent, manager_config

SEQUENCE = ["lock_restart", "open", "write", "close", "sha1", "upgrade"]
LEGACY_AGENT = "Wazuh v3.12.0"  # the QA suite's simulated agent: legacy `com` commands
JSON_AGENT = "Wazuh v4.8.0"
CANCELLED_TEXT = REFERENCE_STATUS_TEXT[TaskStatus.CANCELLED]
TIMEOUT_TEXT = REFERENCE_STATUS_TEXT[TaskStatus.TIMEOUT]
LEGACY_TEXT = REFERENCE_STATUS_TEXT[TaskStatus.LEGACY]

# --------------------------------------------------------------------------- simulated agents


class Sim:
    """A ``ScriptedAgent`` script answering like a real agent (reference §7.2/§7.3).

    JSON commands (target ``upgrade``) and legacy ones (target ``com``) are both served: the
    written bytes are kept (base64 or latin-1 text), ``sha1`` answers their real digest,
    ``upgrade`` the installer's exit status. Knobs:

    * ``stall_at``: never answer that command (the first ``stall_count`` times, or always);
    * ``fail_at``: answer that command with an error (``err ...`` or a JSON error);
    * ``replies``: per command, replies used first, in order (then the normal behaviour);
    * ``hold``: ``(command, n, event)``: block the n-th such command until ``event`` is set.
    """

    def __init__(
        self,
        stall_at: str | None = None,
        fail_at: str | None = None,
        installer_status: str = "0",
        replies: dict[str, list[str]] | None = None,
        stall_count: int | None = None,
        hold: tuple[str, int, threading.Event] | None = None,
    ) -> None:
        self.stall_at = stall_at
        self.stall_count = stall_count
        self.fail_at = fail_at
        self.installer_status = installer_status
        self.replies = {k: list(v) for k, v in (replies or {}).items()}
        self.hold = hold
        self.data = bytearray()
        self.seen: dict[str, int] = {}
        self.times: list[tuple[str, float]] = []

    def __call__(self, target: str, payload: str) -> str | None:
        params: Any
        if target == "com":
            command, _, params = payload.partition(" ")
        else:
            msg = json.loads(payload)
            command, params = msg["command"], msg["parameters"]
        self.seen[command] = self.seen.get(command, 0) + 1
        self.times.append((command, time.monotonic()))
        if command == self.stall_at and (
            self.stall_count is None or self.seen[command] <= self.stall_count
        ):
            return None
        if self.hold and command == self.hold[0] and self.seen[command] == self.hold[1]:
            self.hold[2].wait(10)
        queued = self.replies.get(command)
        if queued:
            return queued.pop(0)
        if command == self.fail_at:
            if target == "com":
                return "err Simulated failure"
            return json.dumps({"error": 7, "message": "File not opened.", "data": []})
        if command == "open":
            self.data.clear()
        elif command == "write":
            if target == "com":
                length, _name, raw = params.split(" ", 2)
                chunk = raw.encode("latin-1")
                assert len(chunk) == int(length)
            else:
                chunk = base64.b64decode(params["buffer"])
                assert len(chunk) == params["length"]
            self.data += chunk
        value = "ok"
        if command == "sha1":
            value = hashlib.sha1(self.data).hexdigest()
        elif command == "upgrade":
            value = self.installer_status
        if target == "com":
            return "ok " if value == "ok" else f"ok {value}"
        return json.dumps({"error": 0, "message": value, "data": []})


def command_of(target: str, payload: str) -> str:
    if target == "com":
        return payload.split(" ", 1)[0]
    return str(json.loads(payload)["command"])


def commands(agent: ScriptedAgent) -> list[str]:
    """The names of the commands an agent received, in order."""
    return [command_of(t, p) for t, p in list(agent.received)]


def written(agent: ScriptedAgent) -> bytes:
    """The bytes a simulated agent received through ``write`` commands."""
    script = agent.script
    assert isinstance(script, Sim)
    return bytes(script.data)


def agent_info(
    agent_id: int,
    version: str = JSON_AGENT,
    platform: str = "ubuntu",
    major: str | None = "22",
    minor: str | None = "04",
    arch: str | None = "x86_64",
) -> AgentInfo:
    """What a simulated agent announces in its hello (the manager records it)."""
    return AgentInfo(
        agent_id=agent_id,
        name=f"agent{agent_id}",
        version=version,
        os_platform=platform,
        os_major=major,
        os_minor=minor,
        os_arch=arch,
    )


def wait_command(h: ManagerHarness, agent: ScriptedAgent, command: str, n: int = 1) -> None:
    """Wait until ``agent`` received ``command`` ``n`` times."""
    h.wait_for(lambda: commands(agent).count(command) >= n, 15)


def wait_status(h: ManagerHarness, agents: list[int], statuses: list[str]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []

    def reached() -> bool:
        nonlocal items
        items = h.result(agents)
        return [i.get("status") for i in items] == statuses

    h.wait_for(reached, 20)
    return items


def upgrade(h: ManagerHarness, agents: list[int], **params: Any) -> list[dict[str, Any]]:
    reply = h.upgrade({"command": "upgrade", "parameters": {"agents": agents, **params}})
    assert reply["error"] == 0 and reply["message"] == "Success", reply
    items: list[dict[str, Any]] = reply["data"]
    return items


def custom(h: ManagerHarness, agents: list[int], **params: Any) -> list[dict[str, Any]]:
    reply = h.upgrade({"command": "upgrade_custom", "parameters": {"agents": agents, **params}})
    assert reply["error"] == 0 and reply["message"] == "Success", reply
    items: list[dict[str, Any]] = reply["data"]
    return items


def ok_item(agent: int, task_id: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"error": 0, "message": "Success", "agent": agent}
    if task_id is not None:
        item["task_id"] = task_id
    return item


def send_event(agent: ScriptedAgent, message: dict[str, Any]) -> dict[str, Any]:
    """Send any event through a simulated agent's connection; the manager's reply."""
    assert agent.channel is not None
    future = asyncio.run_coroutine_threadsafe(agent.channel.send_event(message, 10), agent.loop)
    reply: dict[str, Any] = future.result(15)
    return reply


@contextlib.contextmanager
def agents(h: ManagerHarness, *pairs: tuple[AgentInfo, Sim]) -> Iterator[list[ScriptedAgent]]:
    """Connect simulated agents (hello recorded by the manager); stopped on exit."""
    with contextlib.ExitStack() as stack:
        started = []
        for info, script in pairs:
            started.append(stack.enter_context(ScriptedAgent(h, info, script)))
        yield started


# --------------------------------------------------------------------------- WPK repository

LINUX_NEW = "linux/deb/amd64/wazuh_agent_v4.9.1_linux_amd64.deb.wpk"
LINUX_BAD_SHA1 = "linux/deb/amd64/wazuh_agent_v4.9.0_linux_amd64.deb.wpk"
LINUX_OLD = "linux/x86_64/wazuh_agent_v3.13.1_linux_x86_64.wpk"
WINDOWS_NEW = "windows/wazuh_agent_v4.9.1_windows.wpk"
WRONG_SHA1 = "74691287f21a312ab2a12e31a23f21a33d242d52"


@dataclass(frozen=True)
class Lab:
    """A lab CA, a WPK signer, TLS files for the HTTPS server and a built repository."""

    root: Path
    ca: pki.CaFiles
    signer: pki.CertFiles
    tls: TlsFiles
    repo: Path
    wpks: dict[str, wpk.PackResult]

    def sha1(self, rel: str) -> str:
        return self.wpks[rel].sha1


def pack_wpk(
    work: Path,
    signer: pki.CertFiles,
    out: Path,
    installer: str = "upgrade.sh",
    payload: bytes = b"package bytes\n",
) -> wpk.PackResult:
    """A real signed WPK256 with an installer script and one package file."""
    src = work / f"src-{out.name}"
    src.mkdir(parents=True)
    script = src / installer
    script.write_text("#!/bin/sh\nexit 0\n" if installer.endswith(".sh") else "exit /b 0\r\n")
    package = src / "package.bin"
    package.write_bytes(payload)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = wpk.pack(out, signer.cert, signer.key, [script, package], installer=installer)
    shutil.rmtree(src)
    return result


def build_lab(root: Path) -> Lab:
    """A lab PKI and a reference-layout repository of real signed WPKs under ``root``."""
    ca = pki.create_ca(root / "ca")
    signer = pki.issue_certificate(ca.cert, ca.key, root / "signer", "wpk signer", "code")
    repo = root / "repo"
    wpks = {
        LINUX_NEW: pack_wpk(root, signer, repo / LINUX_NEW),
        LINUX_BAD_SHA1: pack_wpk(root, signer, repo / LINUX_BAD_SHA1),
        LINUX_OLD: pack_wpk(root, signer, repo / LINUX_OLD),
        WINDOWS_NEW: pack_wpk(root, signer, repo / WINDOWS_NEW, installer="upgrade.bat"),
    }
    (repo / "linux/deb/amd64/versions").write_text(
        f"v4.9.1 {wpks[LINUX_NEW].sha1}\nv4.9.0 {WRONG_SHA1}\n"
    )
    (repo / "linux/x86_64/versions").write_text(f"v3.13.1 {wpks[LINUX_OLD].sha1}\n")
    (repo / "windows/versions").write_text(f"v4.9.1 {wpks[WINDOWS_NEW].sha1}\n")
    return Lab(root, ca, signer, make_tls(root / "tls"), repo, wpks)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    return build_lab(tmp_path_factory.mktemp("lab"))


@pytest.fixture(scope="module")
def https_repo(lab: Lab) -> Iterator[RepoServer]:
    with RepoServer(lab.repo, lab.tls) as server:
        yield server


def node_overrides(lab: Lab, repository: str | None, **overrides: Any) -> dict[str, Any]:
    """Manager configuration for these tests: short timeouts, the lab CA trusted for https."""
    upgrade: dict[str, Any] = {
        "command_timeout": 10.0,
        "installer_timeout": 1,
        "open_retry_delay": 0.01,
    }
    if repository is not None:
        upgrade["wpk_repository"] = repository
    upgrade.update(overrides.pop("upgrade", {}))
    sources = {"https": {"ca_bundle": str(lab.tls.ca_cert)}}
    return {"upgrade": upgrade, "sources": sources, **overrides}


MakeNode = Callable[..., ManagerHarness]


@pytest.fixture
def node(make_harness: MakeNode, lab: Lab, https_repo: RepoServer) -> MakeNode:
    """``node(**overrides)``: a manager whose repository is the lab's HTTPS server."""

    def make(repository: str | None = https_repo.base_url, **overrides: Any) -> ManagerHarness:
        return make_harness(**node_overrides(lab, repository, **overrides))

    return make


@contextlib.contextmanager
def manager_at(home: Path, port: int, lab: Lab, **overrides: Any) -> Iterator[ManagerHarness]:
    """A manager on ``home`` whose transport listens on ``port`` (so agents reconnect by
    themselves across a restart); stopped on exit."""
    data = node_overrides(lab, lab.repo.as_uri() + "/", **overrides)
    data["transport"] = {"options": {"listen": f"127.0.0.1:{port}", "heartbeat": 2.0}}
    h = ManagerHarness(manager_config(home, **data))
    h.start()
    try:
        yield h
    finally:
        h.stop()


def wait_connected(h: ManagerHarness, *agent_ids: int) -> None:
    h.wait_for(
        lambda: h.manager is not None and all(h.manager.hub.link(a) is not None for a in agent_ids),
        15,
    )


# =========================================================================== C033 / D6


EXPECTED_MSG = {
    1: "Upgrade procedure exited with error code, missing dependency in agent",
    2: "Upgrade procedure exited with error code",
    0: None,
}


def report_params(error: int) -> dict[str, Any]:
    """What an agent reports after its restart (reference §1.2 step 6)."""
    if error == 0:
        return {"error": 0, "message": "Upgrade was successful", "status": "Done"}
    return {"error": error, "message": "Upgrade failed", "status": "Failed"}


def push_to_updating(h: ManagerHarness, agent: ScriptedAgent, agent_id: int) -> None:
    """Upgrade ``agent_id`` from the repository until its installer started (Updating)."""
    upgrade(h, [agent_id])
    wait_command(h, agent, "upgrade")
    wait_status(h, [agent_id], ["Updating"])


@pytest.mark.parametrize("error", [1, 2, 0])
def test_c033_report_on_upgrade_socket(node: MakeNode, error: int) -> None:
    """The agent's report as analysisd relays it (``agents`` added) on the upgrade socket.

    Error 1 -> missing dependency text, other non-zero -> generic text, 0 -> Done without
    error text (D10: shown as "Error" / "Updated")."""
    c = case("C033")
    message = c["input"]["message"]
    if error != 1:  # the case's own message is the error 1 one
        message = {
            "command": "upgrade_update_status",
            "parameters": {"agents": [25], **report_params(error)},
        }
    h = node()
    with agents(h, (agent_info(25), Sim())) as (a,):
        push_to_updating(h, a, 25)
        assert h.upgrade(message) == c["expected"]["response"]
        (item,) = h.result([25])
        assert item["status"] == ("Error" if error else "Updated")
        assert item.get("error_msg") == EXPECTED_MSG[error]
        if error == 1:
            assert item["error_msg"] == c["expected"]["task_error_msg"]
        # the manager then clears the agent's result file (C068)
        wait_command(h, a, "clear_upgrade_result")


@pytest.mark.parametrize("error", [1, 2, 0])
def test_c033_report_as_agent_event(node: MakeNode, error: int) -> None:
    """The same report sent by the agent itself over its own connection (reference §2.7)."""
    h = node()
    with agents(h, (agent_info(25), Sim())) as (a,):
        push_to_updating(h, a, 25)
        reply = a.report(report_params(error))
        assert reply == {"error": 0, "data": [ok_item(25)], "message": "Success"}
        (item,) = h.result([25])
        assert item["status"] == ("Error" if error else "Updated")
        assert item.get("error_msg") == EXPECTED_MSG[error]
        wait_command(h, a, "clear_upgrade_result")


def test_d6_agent_cannot_report_for_another_agent(node: MakeNode) -> None:
    """D6: an agent may only send ``upgrade_update_status`` about itself; a report naming
    another agent, or any other command, is refused and changes nothing."""
    h = node()
    with agents(h, (agent_info(25), Sim()), (agent_info(26), Sim())) as (a25, a26):
        upgrade(h, [25, 26])
        wait_command(h, a25, "upgrade")
        wait_command(h, a26, "upgrade")
        wait_status(h, [25, 26], ["Updating", "Updating"])
        forged = a25.report({"agents": [26], **report_params(0)})
        assert forged["error"] == 3 and forged["data"][0]["error"] == 3
        other = send_event(a25, {"command": "upgrade", "parameters": {"agents": [25]}})
        assert other["error"] == 3
        assert [i["status"] for i in h.result([25, 26])] == ["Updating", "Updating"]
        assert "clear_upgrade_result" not in commands(a26)
        # its own report is still accepted
        own = a25.report(report_params(0))
        assert own["data"] == [ok_item(25)]
        assert [i["status"] for i in h.result([25, 26])] == ["Updated", "Updating"]


# =========================================================================== C035 / C037 / C040

STEP_TEXT = {
    "lock_restart": "Send lock restart error",
    "write": "Send write file error",
    "close": "Send close file error",
    "sha1": "Send verify sha1 error",
    "upgrade": "Send upgrade command error",
}
STEP_CASE = {"lock_restart": "C035", "write": "C037", "upgrade": "C040"}


@pytest.mark.parametrize("version", [LEGACY_AGENT, JSON_AGENT], ids=["legacy", "json"])
@pytest.mark.parametrize("step", ["lock_restart", "write", "upgrade"])
def test_c035_c037_c040_agent_stalls(node: MakeNode, step: str, version: str) -> None:
    """The agent never answers one step: the manager gives up after ``command_timeout`` (for
    ``upgrade``: installer_timeout + command_timeout), the task ends Error with the step's
    text, and no later step is sent."""
    c = case(STEP_CASE[step])
    h = node(upgrade={"command_timeout": 1.0})
    with agents(h, (agent_info(1, version), Sim(stall_at=step))) as (a,):
        (item,) = upgrade(h, [1])
        assert item["message"] == c["expected"]["step1"]["data[0].message"]
        (result,) = h.wait_final([1])
        assert result["status"] == c["expected"]["step2"]["data[0].status"]
        assert result["error_msg"] == c["expected"]["step2"]["data[0].error_msg"]
        assert commands(a) == SEQUENCE[: SEQUENCE.index(step) + 1]


@pytest.mark.parametrize("version", [LEGACY_AGENT, JSON_AGENT], ids=["legacy", "json"])
@pytest.mark.parametrize("step", ["lock_restart", "write", "close", "sha1", "upgrade"])
def test_agent_answers_error_at_step(node: MakeNode, step: str, version: str) -> None:
    """The agent answers ``err ...`` (legacy) or a JSON error at one step (the other half of
    C035/C037/C040, plus close and sha1): Error with that step's text, nothing sent after."""
    h = node()
    with agents(h, (agent_info(1, version), Sim(fail_at=step))) as (a,):
        upgrade(h, [1])
        (result,) = h.wait_final([1])
        assert (result["status"], result["error_msg"]) == ("Error", STEP_TEXT[step])
        assert commands(a) == SEQUENCE[: SEQUENCE.index(step) + 1]
        if step == "lock_restart":
            assert a.received == [("com", "lock_restart -1")]  # always the legacy form


# =========================================================================== C041


@pytest.mark.parametrize("version", [LEGACY_AGENT, JSON_AGENT], ids=["legacy", "json"])
def test_c041_installer_exit_status_not_zero(node: MakeNode, version: str) -> None:
    """``ok 2`` (legacy) or message "2" (JSON) to ``upgrade``: Error "Send upgrade command
    error"; the task does not wait for a report."""
    c = case("C041")
    h = node()
    with agents(h, (agent_info(1, version), Sim(installer_status="2"))) as (a,):
        upgrade(h, [1])
        (result,) = h.wait_final([1])
        assert result["status"] == "Error"
        assert result["error_msg"] == c["expected"]["error_msg"]
        assert commands(a) == SEQUENCE


# =========================================================================== C042


def test_c042_legacy_target(node: MakeNode, lab: Lab) -> None:
    """Explicit target below v4.1.0 for a v3.12.0 debian 7 agent: the legacy commands push
    the 3.x-layout WPK, then the task is Legacy.

    Design wins (D10): ``status`` is "Legacy" and the reference's sentence (the case's expected
    status) is in ``error_msg``."""
    c = case("C042")
    h = node()
    info = agent_info(1, LEGACY_AGENT, platform="debian", major="7", minor=None)
    with agents(h, (info, Sim())) as (a,):
        (item,) = upgrade(h, [1], version="v3.13.1")
        assert item["message"] == c["expected"]["step1"]["data[0].message"]
        (result,) = h.wait_final([1])
        assert result["status"] == "Legacy"
        assert result["error_msg"] == c["expected"]["step2"]["data[0].status"] == LEGACY_TEXT
        assert commands(a) == SEQUENCE
        assert {t for t, _ in a.received} == {"com"}
        name = Path(LINUX_OLD).name
        assert a.received[-1] == ("com", f"upgrade {name} upgrade.sh")
        assert a.received[4] == ("com", f"sha1 {name}")
        assert hashlib.sha1(written(a)).hexdigest() == lab.sha1(LINUX_OLD)


# =========================================================================== C043 - C047


@pytest.fixture
def empty_http_repo(tmp_path: Path) -> Iterator[RepoServer]:
    with RepoServer(tmp_path / "empty") as server:
        yield server


@pytest.mark.parametrize("where", ["closed port", "404 versions"])
@pytest.mark.parametrize("manager_version", ["v4.9.1", None], ids=["manager-version", "D1"])
def test_c043_repository_not_reachable(
    node: MakeNode, empty_http_repo: RepoServer, where: str, manager_version: str | None
) -> None:
    """The ``versions`` file cannot be read: Success at once, then Error "The repository is
    not reachable"; nothing is sent to the agent.

    With ``manager_version`` set the target is the manager's version (the case's
    precondition). Without it (D1) the newest version could not be read at request time and
    the dispatcher reports the unreachable repository rather than a missing version."""
    c = case("C043")
    url = (
        f"http://127.0.0.1:{closed_port()}/" if where == "closed port" else empty_http_repo.base_url
    )
    h = node(repository=url, manager_version=manager_version)
    with agents(h, (agent_info(1), Sim())) as (a,):
        (item,) = upgrade(h, [1])
        assert item["message"] == c["expected"]["step1"]["data[0].message"]
        (result,) = h.wait_final([1])
        assert result["status"] == c["expected"]["step2"]["data[0].status"]
        assert result["error_msg"] == c["expected"]["step2"]["data[0].error_msg"]
        assert a.received == []
    if where == "404 versions":
        assert empty_http_repo.count("/linux/deb/amd64/versions") >= 1


def test_c044_version_not_in_repository(node: MakeNode, https_repo: RepoServer) -> None:
    """A version the ``versions`` file does not list: Error 15, nothing sent to the agent."""
    c = case("C044")
    h = node()
    with agents(h, (agent_info(1), Sim())) as (a,):
        (item,) = upgrade(h, [1], version="v4.55.55", force_upgrade=True)
        assert item["message"] == c["expected"]["step1"]["data[0].message"]
        (result,) = h.wait_final([1])
        assert result["status"] == c["expected"]["step2"]["data[0].status"]
        assert result["error_msg"] == c["expected"]["step2"]["data[0].error_msg"]
        assert a.received == []


def test_c044_malformed_version_without_repository(node: MakeNode) -> None:
    """The case's note: a malformed version (``v.4.1``) with no repository configured gives
    the same error, asynchronously."""
    h = node(repository=None)
    with agents(h, (agent_info(1), Sim())) as (a,):
        (item,) = upgrade(h, [1], version="v.4.1")
        assert item == ok_item(1, 1)
        (result,) = h.wait_final([1])
        assert result["error_msg"] == "The version of the WPK does not exist in the repository"
        assert a.received == []


def test_c045_wpk_sha1_differs_from_versions_file(
    node: MakeNode, https_repo: RepoServer, lab: Lab
) -> None:
    """The downloaded WPK does not hash to the ``versions`` SHA1: Error 17, nothing sent, the
    bad download is not kept in the cache."""
    c = case("C045")
    h = node()
    with agents(h, (agent_info(1), Sim())) as (a,):
        upgrade(h, [1], version="v4.9.0")
        (result,) = h.wait_final([1])
        assert result["status"] == "Error"
        assert result["error_msg"] == c["expected"]["error_msg"]
        assert a.received == []
    assert not (h.config.cache_dir / Path(LINUX_BAD_SHA1).name).exists()


def test_c045_bad_cached_copy_is_downloaded_again(
    node: MakeNode, https_repo: RepoServer, lab: Lab
) -> None:
    """The case's note: a cached file with the wrong hash is downloaded again and checked;
    the push then uses the good copy."""
    h = node()
    cached = h.config.cache_dir / Path(LINUX_NEW).name
    cached.write_bytes(b"corrupted cache entry")
    before = https_repo.count(Path(LINUX_NEW).name)
    with agents(h, (agent_info(1), Sim())) as (a,):
        upgrade(h, [1])
        wait_command(h, a, "upgrade")
        wait_status(h, [1], ["Updating"])
        assert hashlib.sha1(written(a)).hexdigest() == lab.sha1(LINUX_NEW)
        assert_signed_wpk(lab, written(a), h.config.home / "received.wpk")
    assert https_repo.count(Path(LINUX_NEW).name) == before + 1
    assert hashlib.sha1(cached.read_bytes()).hexdigest() == lab.sha1(LINUX_NEW)


@pytest.mark.parametrize("file_path", ["invalid/path/to.wpk", "/nonexistent/dir/to.wpk"])
def test_c047_custom_wpk_missing(node: MakeNode, file_path: str) -> None:
    """``upgrade_custom`` with a file that cannot be opened: Success, then Error "The WPK file
    does not exist" (the file is checked asynchronously); nothing sent to the agent."""
    c = case("C047")
    h = node()
    mojave = agent_info(1, "Wazuh v4.3.0", platform="darwin", major="10", minor="14")
    with agents(h, (mojave, Sim())) as (a,):
        (item,) = custom(h, [1], file_path=file_path)
        assert item["message"] == c["expected"]["step1"]["data[0].message"]
        (result,) = h.wait_final([1])
        assert result["status"] == c["expected"]["step2"]["data[0].status"]
        assert result["error_msg"] == c["expected"]["step2"]["data[0].error_msg"]
        assert a.received == []


# =========================================================================== C048 / C049


def _custom_file(h: ManagerHarness, lab: Lab) -> Path:
    path = h.config.home / "var" / "upgrade" / "wpk_test.wpk"
    shutil.copy(lab.repo / LINUX_NEW, path)
    return path


@pytest.mark.parametrize("installer", ["custom_installer.sh", None])
def test_c048_custom_wpk_installer(node: MakeNode, lab: Lab, installer: str | None) -> None:
    """``upgrade_custom``: the agent gets the file's basename and the requested installer
    (default ``upgrade.sh``); the SHA1 checked is computed locally; the task waits Updating."""
    c = case("C048")
    h = node()
    path = _custom_file(h, lab)
    mojave = agent_info(1, "Wazuh v4.3.0", platform="darwin", major="10", minor="14")
    with agents(h, (mojave, Sim())) as (a,):
        params: dict[str, Any] = {"file_path": str(path)}
        if installer:
            params["installer"] = installer
        (item,) = custom(h, [1], **params)
        assert item["message"] == c["expected"]["response_item"]["message"]
        wait_command(h, a, "upgrade")
        (result,) = wait_status(h, [1], [c["expected"]["task_status_after"]])
        assert result["command"] == "upgrade_custom"
        target, payload = a.received[-1]
        assert target == "upgrade"
        assert json.loads(payload) == {
            "command": "upgrade",
            "parameters": {"file": "wpk_test.wpk", "installer": installer or "upgrade.sh"},
        }
        assert [json.loads(p)["parameters"]["file"] for t, p in a.received[1:]] == [
            "wpk_test.wpk"
        ] * 5


@pytest.mark.parametrize(
    "answer,outcome",
    [
        ("local-upper", ("Updating", None)),
        ("other", ("Error", "Send verify sha1 error")),
    ],
)
def test_c048_sha1_expected_is_computed_locally(
    node: MakeNode, lab: Lab, answer: str, outcome: tuple[str, str | None]
) -> None:
    """The SHA1 the manager expects for a custom WPK is the file's own digest: the same
    digest in upper case is accepted (reference §11 case-sensitivity bug fixed), any other
    one (here: the SHA1 a versions file gives for another WPK) fails the task."""
    h = node()
    path = _custom_file(h, lab)
    digest = (
        hashlib.sha1(path.read_bytes()).hexdigest().upper()
        if answer == "local-upper"
        else lab.sha1(LINUX_OLD)
    )
    reply = json.dumps({"error": 0, "message": digest, "data": []})
    with agents(h, (agent_info(1), Sim(replies={"sha1": [reply]}))) as (a,):
        custom(h, [1], file_path=str(path))
        status, error_msg = outcome
        if status == "Updating":
            wait_command(h, a, "upgrade")
            (result,) = wait_status(h, [1], ["Updating"])
        else:
            (result,) = h.wait_final([1])
            assert "upgrade" not in commands(a)
        assert (result["status"], result.get("error_msg")) == (status, error_msg)


def test_c049_default_installer_per_platform(node: MakeNode, lab: Lab) -> None:
    """Legacy (v3.13.0) linux and windows agents upgraded from the repository: the last
    command names ``upgrade.sh`` / ``upgrade.bat`` and the WPK of each platform's layout."""
    c = case("C049")
    h = node()
    linux = agent_info(111, "Wazuh v3.13.0", major="16", minor="04")
    windows = agent_info(112, "Wazuh v3.13.0", platform="windows", major="6", minor="1")
    with agents(h, (linux, Sim()), (windows, Sim())) as (al, aw):
        upgrade(h, [111, 112])
        wait_command(h, al, "upgrade")
        wait_command(h, aw, "upgrade")
        wait_status(h, [111, 112], ["Updating", "Updating"])
        assert c["expected"]["linux_last_command"].endswith("upgrade.sh")
        assert al.received[-1] == ("com", f"upgrade {Path(LINUX_NEW).name} upgrade.sh")
        assert c["expected"]["windows_last_command"].endswith("upgrade.bat")
        assert aw.received[-1] == ("com", f"upgrade {Path(WINDOWS_NEW).name} upgrade.bat")


def test_c049_custom_default_installer_on_windows(node: MakeNode, lab: Lab) -> None:
    """``upgrade_custom`` without installer on a windows agent: ``upgrade.bat`` (§1.3)."""
    h = node()
    path = _custom_file(h, lab)
    windows = agent_info(5, JSON_AGENT, platform="windows", major="10", minor="0")
    with agents(h, (windows, Sim())) as (a,):
        custom(h, [5], file_path=str(path))
        wait_command(h, a, "upgrade")
        assert json.loads(a.received[-1][1])["parameters"] == {
            "file": "wpk_test.wpk",
            "installer": "upgrade.bat",
        }


# =========================================================================== C050 - C053


def _stalled_and_queued(h: ManagerHarness) -> tuple[ScriptedAgent, ScriptedAgent]:
    """Two v3.11.3 agents, max_threads 1: agent 1 stalls at lock_restart (Updating) and
    agent 2 waits In queue (the QA suite's set-up)."""
    a1 = ScriptedAgent(h, agent_info(1, "Wazuh v3.11.3"), Sim(stall_at="lock_restart"))
    a2 = ScriptedAgent(h, agent_info(2, "Wazuh v3.11.3"), Sim())
    a1.start()
    a2.start()
    assert upgrade(h, [1, 2]) == [ok_item(1, 1), ok_item(2, 2)]
    wait_command(h, a1, "lock_restart")
    wait_status(h, [1, 2], ["Updating", "In queue"])
    return a1, a2


RESTART = {"upgrade": {"max_threads": 1, "command_timeout": 30.0}}


def test_c050_restart_cancels_queued_task(tmp_path: Path, lab: Lab) -> None:
    """``task_manager.on_restart = "cancel"`` (the reference's behaviour): after a restart the
    queued task is Cancelled, the one being pushed stays Updating.

    Design wins (D10): ``status`` "Cancelled" with the case's sentence in ``error_msg``."""
    c = case("C050")
    home, port = tmp_path / "manager", closed_port()
    opts = {**RESTART, "task_manager": {"on_restart": "cancel"}}
    with contextlib.ExitStack() as stack:
        with manager_at(home, port, lab, **opts) as h1:
            a1, a2 = _stalled_and_queued(h1)
            stack.callback(a1.stop)
            stack.callback(a2.stop)
        with manager_at(home, port, lab, **opts) as h2:
            one, two = h2.result([1, 2])
            assert one["status"] == c["expected"]["agent1_status"]
            assert "error_msg" not in one
            assert two["status"] == "Cancelled"
            assert two["error_msg"] == c["expected"]["agent2_status"] == CANCELLED_TEXT
            wait_connected(h2, 1, 2)
            assert [i["status"] for i in h2.result([1, 2])] == ["Updating", "Cancelled"]
            assert a2.received == []
            assert commands(a1) == ["lock_restart"]


def test_c050_restart_resumes_queued_task(tmp_path: Path, lab: Lab) -> None:
    """Default ``on_restart = "resume"`` (issue 5 recovery, not the reference): the push that
    the restart cut (task 1, stalled at lock_restart) is pushed again first, and the queued
    task 2 is pushed once its agent is back. Agent 1 still stalls, so task 1 ends Error with the
    reason after the (short) command timeout; task 2 goes through its whole sequence."""
    home, port = tmp_path / "manager", closed_port()
    again = {"upgrade": {"max_threads": 1, "command_timeout": 2.0}}
    with contextlib.ExitStack() as stack:
        with manager_at(home, port, lab, **RESTART) as h1:
            a1, a2 = _stalled_and_queued(h1)
            stack.callback(a1.stop)
            stack.callback(a2.stop)
        with manager_at(home, port, lab, **again) as h2:
            wait_command(h2, a2, "upgrade")
            items = wait_status(h2, [1, 2], ["Error", "Updating"])
            assert [i["task_id"] for i in items] == [1, 2]
            assert items[0]["error_msg"] == "Send lock restart error"
            assert commands(a2) == SEQUENCE
            assert commands(a1) == ["lock_restart", "lock_restart"]


def test_c052_node_rename_replaces_pending_task(tmp_path: Path, lab: Lab) -> None:
    """Restart under another node name: the old node's tasks are not touched at start
    (Updating, In queue); a new request from the new node is refused for the In progress
    task (any node) and replaces the old node's Pending one."""
    c = case("C052")
    home, port = tmp_path / "manager", closed_port()
    with contextlib.ExitStack() as stack:
        with manager_at(home, port, lab, **RESTART) as h1:
            a1, a2 = _stalled_and_queued(h1)
            stack.callback(a1.stop)
            stack.callback(a2.stop)
        with manager_at(home, port, lab, node_name="new_node_name", **RESTART) as h2:
            items = h2.result([1, 2])
            assert [i["status"] for i in items] == c["expected"]["statuses_after_restart"]
            assert [i["node"] for i in items] == ["node01", "node01"]
            wait_connected(h2, 1, 2)
            assert [i["status"] for i in h2.result([1, 2])] == ["Updating", "In queue"]
            first = upgrade(h2, [1])[0]
            second = upgrade(h2, [2])[0]
            assert [first["message"], second["message"]] == c["expected"]["new_request_messages"]
            assert second == ok_item(2, 3)
            assert h2.store.get_task(2) is None  # the old node's Pending task was deleted
            wait_command(h2, a2, "upgrade")
            (item,) = wait_status(h2, [2], ["Updating"])
            assert (item["task_id"], item["node"]) == (3, "new_node_name")


def test_c053_node_rename_after_timeout(tmp_path: Path, lab: Lab) -> None:
    """An Updating task of the old node times out under the renamed node; a new request then
    succeeds.

    Design wins (D10): ``status`` "Timeout", the sentence in ``error_msg`` (the case quotes the
    pre-4.9 shorter text, a prefix of ours)."""
    c = case("C053")
    home, port = tmp_path / "manager", closed_port()
    timing = {"task_manager": {"task_timeout": 2, "sweep_interval": 1}}
    with contextlib.ExitStack() as stack:
        with manager_at(home, port, lab, **timing) as h1:
            a1 = stack.enter_context(ScriptedAgent(h1, agent_info(1), Sim()))
            upgrade(h1, [1])
            wait_command(h1, a1, "upgrade")
            wait_status(h1, [1], ["Updating"])
        with manager_at(home, port, lab, node_name="new_node_name", **timing) as h2:
            (item,) = h2.wait_final([1], timeout=15)
            assert item["status"] == "Timeout"
            assert item["error_msg"].startswith(c["expected"]["status"])
            wait_connected(h2, 1)
            (new,) = upgrade(h2, [1])
            assert new["message"] == c["expected"]["new_request_message"]
            wait_command(h2, a1, "upgrade", 2)


def test_c051_task_timeout_then_new_request_and_late_report(node: MakeNode) -> None:
    """Two agents take the WPK but never report: both end Timeout after ``task_timeout``.

    Design wins: D10 (``status`` "Timeout", sentence in ``error_msg``); D7 (agent 1's late
    Done is recorded: Updated, with the Timeout kept in the history). A new request for
    agent 2 after its Timeout succeeds (QA case 14)."""
    c = case("C051")
    h = node(task_manager={"task_timeout": 2, "sweep_interval": 1})
    with agents(h, (agent_info(1), Sim()), (agent_info(2), Sim())) as (a1, a2):
        upgrade(h, [1, 2])
        wait_command(h, a1, "upgrade")
        wait_command(h, a2, "upgrade")
        items = h.wait_final([1, 2], timeout=15)
        for item in items:
            assert item["status"] == "Timeout"
            assert item["error_msg"] == c["expected"]["status"] == TIMEOUT_TEXT
        late = a1.report(report_params(0))
        assert late["data"] == [ok_item(1)]
        (one,) = h.result([1])
        assert (one["status"], one["task_id"]) == ("Updated", 1)
        assert "error_msg" not in one
        path = [change.to_status for change in h.store.history(1)]
        assert path == [
            TaskStatus.PENDING,
            TaskStatus.IN_PROGRESS,
            TaskStatus.TIMEOUT,
            TaskStatus.DONE,
        ]
        wait_command(h, a1, "clear_upgrade_result")
        assert upgrade(h, [2]) == [ok_item(2, 3)]
        wait_command(h, a2, "upgrade", 2)
        wait_status(h, [2], ["Updating"])


def test_d7_timeout_counts_from_updating(node: MakeNode) -> None:
    """D7: a task waiting In queue longer than ``task_timeout`` does not time out; the clock
    starts when it becomes Updating. (max_threads 1; agent 1 holds the only slot by stalling
    at lock_restart for longer than task_timeout.)

    Agent 1 times out while its push still waits; when the push then fails the late outcome
    is recorded over the Timeout (the transition table's Timeout -> Failed), history kept."""
    h = node(
        upgrade={"max_threads": 1, "command_timeout": 4.0},
        task_manager={"task_timeout": 2, "sweep_interval": 1},
    )
    with agents(h, (agent_info(1), Sim(stall_at="lock_restart")), (agent_info(2), Sim())) as (
        a1,
        a2,
    ):
        upgrade(h, [1, 2])
        wait_status(h, [1, 2], ["Timeout", "In queue"])
        wait_command(h, a2, "upgrade")
        wait_status(h, [2], ["Updating"])
        assert [c.to_status for c in h.store.history(2)] == [
            TaskStatus.PENDING,
            TaskStatus.IN_PROGRESS,
        ]
        (one,) = h.result([1])
        assert (one["status"], one["error_msg"]) == ("Error", "Send lock restart error")
        assert TaskStatus.TIMEOUT in [c.to_status for c in h.store.history(1)]
        assert commands(a1) == ["lock_restart"]


def test_one_push_at_a_time_per_agent(node: MakeNode) -> None:
    """A new task of an agent whose previous task timed out mid-push waits until that push
    has ended before it sends anything (one open file per agent)."""
    h = node(
        upgrade={"max_threads": 4, "command_timeout": 4.0},
        task_manager={"task_timeout": 2, "sweep_interval": 1},
    )
    sim = Sim(stall_at="lock_restart", stall_count=1)
    with agents(h, (agent_info(1), sim)) as (a,):
        upgrade(h, [1])
        wait_status(h, [1], ["Timeout"])
        assert upgrade(h, [1]) == [ok_item(1, 2)]
        wait_command(h, a, "upgrade")
        wait_status(h, [1], ["Updating"])
        first, second = [t for name, t in sim.times if name == "lock_restart"]
        assert second - first >= 3.9  # only after the first push gave up (command_timeout 4)
        assert commands(a) == ["lock_restart", *SEQUENCE]
        old = h.store.get_task(1)
        assert old is not None and old.status is TaskStatus.FAILED
        # the new task waited In queue, so its own timeout never ran (D7)
        assert TaskStatus.TIMEOUT not in [c.to_status for c in h.store.history(2)]


# =========================================================================== robustness


def test_malformed_request_between_running_upgrades(node: MakeNode) -> None:
    """Garbage and truncated frames on the upgrade socket while upgrades run get a coded
    answer (C001's reply); the next request is served and no stored task is lost."""
    h = node(upgrade={"command_timeout": 30.0})
    pairs = [(agent_info(1), Sim(stall_at="write"))] + [(agent_info(i), Sim()) for i in (2, 3, 4)]
    with agents(h, *pairs) as (a1, a2, a3, a4):
        assert upgrade(h, [1, 2, 3]) == [ok_item(1, 1), ok_item(2, 2), ok_item(3, 3)]
        wait_command(h, a1, "write")
        assert h.send_raw("upgrade", b"\x00\xff{not json") == case("C001")["expected"]["response"]
        with socket.socket(socket.AF_UNIX) as s:  # a frame cut short, then the client leaves
            s.connect(str(h.config.upgrade_socket))
            s.sendall(HEADER.pack(64) + b'{"command":"upgr')
        bad = h.upgrade({"command": "upgrade", "parameters": {"agents": "all"}})
        assert bad["error"] != 0 and bad["data"][0]["error"] != 0
        assert upgrade(h, [4]) == [ok_item(4, 4)]
        for a in (a2, a3, a4):
            wait_command(h, a, "upgrade")
        items = wait_status(h, [1, 2, 3, 4], ["Updating"] * 4)
        assert [i["task_id"] for i in items] == [1, 2, 3, 4]
        for task_id in (1, 2, 3, 4):
            task = h.store.get_task(task_id)
            assert task is not None and task.status is TaskStatus.IN_PROGRESS
        assert a2.report({"error": 0, "message": "ok", "status": "Done"})["data"] == [ok_item(2)]
        assert [i["status"] for i in h.result([1, 2, 3, 4])] == [
            "Updating",
            "Updated",
            "Updating",
            "Updating",
        ]


def assert_signed_wpk(lab: Lab, data: bytes, where: Path) -> None:
    """``data`` (what an agent received) is a WPK that verifies against the lab CA."""
    where.write_bytes(bytes(data))
    verified = wpk.verify(where, [lab.ca.cert])
    assert verified.ca_verified and "wpk signer" in verified.signer_subject
