"""Black-box cases of category E (manager-to-agent WPK transfer) and C114 (the manager side of
the agent's final report) through the real sockets and the real transport.

A real manager node pushes real files to a simulated agent (``ScriptedAgent`` + ``Sim`` from
``test_cases_async``), which records every command exactly as it arrives, so the tests compare
the command payloads with the reference's (§7.1-7.3).

Our transport differs from the reference in framing only: the reference writes
``"<agent id> <target> <payload>"`` to remoted's socket (e.g. ``111 com open wb test.wpk``),
our tcp transport sends ``target`` and ``payload`` as fields of a request on the agent's own
connection. The tests therefore compare ``(target, payload)`` with the case's text after its
``"NNN <target> "`` prefix.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from httpfixtures import RepoServer
from shared_cases import case
from test_cases_async import (
    JSON_AGENT,
    LEGACY_AGENT,
    LINUX_NEW,
    SEQUENCE,
    Lab,
    Sim,
    agent_info,
    agents,
    assert_signed_wpk,
    build_lab,
    commands,
    custom,
    node_overrides,
    ok_item,
    pack_wpk,
    push_to_updating,
    report_params,
    upgrade,
    wait_command,
    wait_status,
    written,
)

from wpk_upgrade.testing.harness import ManagerHarness

MakeNode = Callable[..., ManagerHarness]
OK_JSON = '{"error":0,"message":"ok","data":[]}'
CLEAR = '{"command":"clear_upgrade_result","parameters":{}}'


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    return build_lab(tmp_path_factory.mktemp("lab"))


@pytest.fixture(scope="module")
def https_repo(lab: Lab) -> Iterator[RepoServer]:
    with RepoServer(lab.repo, lab.tls) as server:
        yield server


@pytest.fixture
def node(make_harness: MakeNode, lab: Lab, https_repo: RepoServer) -> MakeNode:
    def make(**overrides: Any) -> ManagerHarness:
        return make_harness(**node_overrides(lab, https_repo.base_url, **overrides))

    return make


def case_wpk(h: ManagerHarness, data: bytes = b"test\n") -> Path:
    """The case's ``test.wpk`` (the manager does not look inside a custom WPK)."""
    path = h.config.home / "var" / "upgrade" / "test.wpk"
    path.write_bytes(data)
    return path


def unprefixed(text: str) -> tuple[str, str]:
    """``"039 upgrade {...}"`` -> ``("upgrade", "{...}")``."""
    _counter, target, payload = text.split(" ", 2)
    return target, payload


# =========================================================================== C062


def test_c062_legacy_command_sequence(node: MakeNode) -> None:
    """Agent 111 at v3.13.0: the six legacy ``com`` commands, exactly; the raw bytes of the
    5-byte file travel after the file name.

    The case's SHA1 ``d321af...`` is a value its unit test mocks on both sides; here the
    manager computes the real SHA1 of ``test\\n`` and the agent answers the real one."""
    c = case("C062")
    h = node()
    path = case_wpk(h)
    digest = hashlib.sha1(b"test\n").hexdigest()
    replies = {"sha1": [f"ok {digest}"], "upgrade": ["ok 0"]}
    info = agent_info(111, "Wazuh v3.13.0", major="16", minor="04")
    with agents(h, (info, Sim(replies=replies))) as (a,):
        custom(h, [111], file_path=str(path))
        wait_command(h, a, "upgrade")
        wait_status(h, [111], ["Updating"])
        expected = [unprefixed(line) for line in c["expected"]["sent_in_order"]]
        expected[2] = ("com", expected[2][1].replace("\\n", "\n"))  # the raw byte
        assert a.received == expected
        assert a.received == [
            ("com", "lock_restart -1"),
            ("com", "open wb test.wpk"),
            ("com", "write 5 test.wpk test\n"),
            ("com", "close test.wpk"),
            ("com", "sha1 test.wpk"),
            ("com", "upgrade test.wpk upgrade.sh"),
        ]


def test_c062_legacy_write_carries_raw_bytes(node: MakeNode) -> None:
    """Every byte value survives the legacy ``write`` (raw bytes carried as latin-1 text);
    chunks are at most ``chunk_size`` bytes, the last one shorter."""
    h = node(upgrade={"chunk_size": 64})
    data = bytes(range(256)) * 2 + b"\x00\xff\n\r tail"
    path = case_wpk(h, data)
    with agents(h, (agent_info(7, LEGACY_AGENT), Sim())) as (a,):
        custom(h, [7], file_path=str(path))
        wait_command(h, a, "upgrade")
        wait_status(h, [7], ["Updating"])
        writes = [p for t, p in a.received if t == "com" and p.startswith("write ")]
        sizes = [int(p.split(" ", 2)[1]) for p in writes]
        assert sizes == [64] * 8 + [len(data) - 512]
        assert written(a) == data


def test_legacy_agent_receives_a_verifiable_signed_wpk(node: MakeNode, lab: Lab) -> None:
    """A signed WPK from the HTTPS repository, pushed to a legacy agent in 64-byte chunks,
    arrives byte for byte: it still verifies against the lab CA."""
    h = node(upgrade={"chunk_size": 64})
    with agents(h, (agent_info(8, LEGACY_AGENT), Sim())) as (a,):
        upgrade(h, [8])
        wait_command(h, a, "upgrade")
        wait_status(h, [8], ["Updating"])
        size = (lab.repo / LINUX_NEW).stat().st_size
        assert commands(a).count("write") == -(-size // 64)
        assert hashlib.sha1(written(a)).hexdigest() == lab.sha1(LINUX_NEW)
        assert_signed_wpk(lab, written(a), h.config.home / "got.wpk")


# =========================================================================== C063


def test_c063_json_command_format(node: MakeNode) -> None:
    """Agent at v4.1.0 (the boundary): ``lock_restart`` in the legacy form, then the JSON
    commands of target ``upgrade``, byte for byte as the case shows (base64 buffer, raw
    length, installer name)."""
    c = case("C063")
    h = node()
    path = case_wpk(h)
    with agents(h, (agent_info(39, "Wazuh v4.1.0"), Sim())) as (a,):
        custom(h, [39], file_path=str(path), installer="install.sh")
        wait_command(h, a, "upgrade")
        wait_status(h, [39], ["Updating"])
        exp = c["expected"]
        assert a.received == [
            ("com", "lock_restart -1"),
            unprefixed(exp["open"]),
            unprefixed(exp["write"]),
            unprefixed(exp["close"]),
            unprefixed(exp["sha1"]),
            unprefixed(exp["upgrade"]),
        ]
        assert json.loads(a.received[2][1])["parameters"]["buffer"] == "dGVzdAo="


@pytest.mark.parametrize(
    "version,target",
    [
        ("Wazuh v3.13.0", "com"),
        ("Wazuh v4.0.4", "com"),
        ("Wazuh v4.1.0", "upgrade"),
        ("Wazuh v4.14.7", "upgrade"),
    ],
)
def test_c063_format_chosen_by_agent_version(node: MakeNode, version: str, target: str) -> None:
    """Agents >= v4.1.0 get JSON commands (target ``upgrade``), older ones legacy text
    (target ``com``); ``lock_restart`` is always legacy."""
    h = node()
    path = case_wpk(h)
    with agents(h, (agent_info(3, version), Sim())) as (a,):
        custom(h, [3], file_path=str(path))
        wait_command(h, a, "upgrade")
        assert commands(a) == SEQUENCE
        assert [t for t, _ in a.received] == ["com"] + [target] * 5


def test_c063_format_follows_agent_not_target(node: MakeNode) -> None:
    """A v4.8.0 agent forced down to v3.13.1 still gets JSON commands (the format follows the
    agent's current version); the explicit target below v4.1.0 makes the task Legacy."""
    h = node()
    with agents(h, (agent_info(4, JSON_AGENT), Sim())) as (a,):
        upgrade(h, [4], version="v3.13.1", force_upgrade=True)
        (item,) = h.wait_final([4])
        assert item["status"] == "Legacy"
        assert [t for t, _ in a.received] == ["com"] + ["upgrade"] * 5
        assert json.loads(a.received[1][1])["parameters"]["file"] == (
            "wazuh_agent_v3.13.1_linux_x86_64.wpk"
        )


# =========================================================================== C065

OPEN_ERROR = {
    LEGACY_AGENT: "err Could not open file in agent",
    JSON_AGENT: json.dumps({"error": 6, "message": "File Open Error: Permission denied"}),
}


@pytest.mark.parametrize("version", [LEGACY_AGENT, JSON_AGENT], ids=["legacy", "json"])
def test_c065_open_retried_then_succeeds(node: MakeNode, version: str) -> None:
    """First ``open`` refused, second accepted: the push goes on and succeeds."""
    c = case("C065")
    assert c["expected"]["result"] == "success after 2 attempts"
    h = node()
    with agents(h, (agent_info(1, version), Sim(replies={"open": [OPEN_ERROR[version]]}))) as (a,):
        upgrade(h, [1])
        wait_command(h, a, "upgrade")
        wait_status(h, [1], ["Updating"])
        assert commands(a) == ["lock_restart", "open", *SEQUENCE[1:]]


@pytest.mark.parametrize("version", [LEGACY_AGENT, JSON_AGENT], ids=["legacy", "json"])
def test_c065_open_fails_ten_times(node: MakeNode, version: str) -> None:
    """Ten refused ``open`` attempts: Error "Send open file error", nothing written."""
    h = node()
    script = Sim(replies={"open": [OPEN_ERROR[version]] * 10})
    with agents(h, (agent_info(1, version), script)) as (a,):
        upgrade(h, [1])
        (item,) = h.wait_final([1])
        assert (item["status"], item["error_msg"]) == ("Error", "Send open file error")
        assert commands(a) == ["lock_restart"] + ["open"] * 10


# =========================================================================== C067


@pytest.mark.parametrize(
    "reply,accepted",
    [
        ('{"error":0,"message":""}', True),
        ('{"error":0,"message":"1234567890"}', True),
        (OK_JSON, True),
        ('{"error":1,"message":"invalid request"}', False),
        ('{"error":9,"message":"The target file doesn\'t match the opened file"}', False),
        ('{"unknown":1}', False),
        ('{"message":"ok"}', False),
        ("this is not JSON", False),
        ("[0]", False),
        (None, False),  # no reply at all
    ],
)
def test_c067_reply_parsing(node: MakeNode, reply: str | None, accepted: bool) -> None:
    """The agent's answer to ``close`` (one attempt, no retry): ``error`` 0 is a success,
    any other ``error``, no ``error`` key, text that is not a JSON object, or silence is a
    failure ("Send close file error") and stops the push."""
    h = node(upgrade={"command_timeout": 1.0})
    script = Sim(stall_at="close") if reply is None else Sim(replies={"close": [reply]})
    with agents(h, (agent_info(1), script)) as (a,):
        upgrade(h, [1])
        if accepted:
            wait_command(h, a, "upgrade")
            wait_status(h, [1], ["Updating"])
            assert commands(a) == SEQUENCE
        else:
            (item,) = h.wait_final([1])
            assert (item["status"], item["error_msg"]) == ("Error", "Send close file error")
            assert commands(a) == SEQUENCE[:4]


@pytest.mark.parametrize("right", [True, False])
def test_c067_message_is_the_data(node: MakeNode, lab: Lab, right: bool) -> None:
    """``{"error":0,"message":M}`` gives M as the data: for ``sha1`` it is the digest compared
    with the expected one (``1234567890`` fails; the real digest, even without a ``data``
    key, succeeds)."""
    h = node()
    digest = lab.sha1(LINUX_NEW) if right else "1234567890"
    sim = Sim(replies={"sha1": [json.dumps({"error": 0, "message": digest})]})
    with agents(h, (agent_info(1), sim)) as (a,):
        upgrade(h, [1])
        if right:
            wait_command(h, a, "upgrade")
            wait_status(h, [1], ["Updating"])
        else:
            (item,) = h.wait_final([1])
            assert (item["status"], item["error_msg"]) == ("Error", "Send verify sha1 error")
            assert commands(a) == SEQUENCE[:5]


# =========================================================================== C068 / C114


def test_c114_report_on_upgrade_socket_then_clear(node: MakeNode) -> None:
    """Agent 2's Done report on the upgrade socket: the exact reply, the task Done (shown
    "Updated", no error text), then ``clear_upgrade_result`` sent to agent 2 (C068)."""
    c = case("C114")
    h = node()
    with agents(h, (agent_info(2), Sim())) as (a,):
        push_to_updating(h, a, 2)
        assert h.upgrade(c["input"]["message"]) == c["expected"]["response"]
        (item,) = h.result([2])
        assert item["status"] == "Updated" and "error_msg" not in item
        wait_command(h, a, "clear_upgrade_result")
        sent = case("C068")["expected"]["sent_to_agent"]
        assert a.received[-1] == unprefixed(sent) == ("upgrade", CLEAR)


def test_c068_clear_after_agent_event(node: MakeNode) -> None:
    """Agent 15 reports through its own connection: once the status change is accepted the
    manager sends ``015 upgrade {"command":"clear_upgrade_result","parameters":{}}``."""
    c = case("C068")
    h = node()
    with agents(h, (agent_info(15), Sim())) as (a,):
        push_to_updating(h, a, 15)
        reply = a.report(report_params(0))
        assert reply == {"error": 0, "data": [ok_item(15)], "message": "Success"}
        wait_command(h, a, "clear_upgrade_result")
        assert a.received[-1] == unprefixed(c["expected"]["sent_to_agent"])
        assert commands(a) == [*SEQUENCE, "clear_upgrade_result"]


def test_c068_clear_refused_changes_nothing(node: MakeNode) -> None:
    """The agent answers ``clear_upgrade_result`` with an error (its result file is gone):
    the task stays Updated. The agent's next report (it keeps reporting until cleared) is
    answered "No task in DB" and still gets a ``clear_upgrade_result`` (reference §7.6)."""
    h = node()
    refused = json.dumps({"error": 19, "message": "Could not erase upgrade_result file"})
    with agents(h, (agent_info(1), Sim(replies={"clear_upgrade_result": [refused]}))) as (a,):
        push_to_updating(h, a, 1)
        done = report_params(0)
        assert a.report(done)["data"] == [ok_item(1)]
        wait_command(h, a, "clear_upgrade_result")
        assert h.result([1])[0]["status"] == "Updated"
        again = a.report(done)
        assert again["data"] == [{"error": 3, "message": "No task in DB", "agent": 1}]
        wait_command(h, a, "clear_upgrade_result", 2)
        assert h.result([1])[0]["status"] == "Updated"


def test_report_without_task_still_clears(node: MakeNode) -> None:
    """A report from an agent that has no task: "No task in DB", and the agent's result
    file is cleared anyway so it stops reporting (reference §7.6)."""
    h = node()
    with agents(h, (agent_info(9), Sim())) as (a,):
        reply = a.report(report_params(2))
        assert reply["data"] == [{"error": 3, "message": "No task in DB", "agent": 9}]
        wait_command(h, a, "clear_upgrade_result")
        assert a.received == [("upgrade", CLEAR)]


# =========================================================================== progress


def test_progress_while_pushing_a_larger_wpk(node: MakeNode, lab: Lab, tmp_path: Path) -> None:
    """While a 256 KiB signed WPK is written in 8 KiB chunks, ``upgrade_result`` (on both
    sockets) shows ``progress`` {sent, total} below the total; at the end sent = total = the
    WPK's size, and the agent holds a WPK that verifies."""
    h = node(upgrade={"chunk_size": 8192})
    big = pack_wpk(tmp_path, lab.signer, tmp_path / "big.wpk", payload=os.urandom(256 * 1024))
    release = threading.Event()
    sim = Sim(hold=("write", 3, release))
    try:
        with agents(h, (agent_info(1), sim)) as (a,):
            custom(h, [1], file_path=str(big.path))
            seen: dict[str, Any] = {}

            def partial() -> bool:
                progress = h.result([1])[0].get("progress")
                if progress and 0 < progress["sent"] < progress["total"]:
                    seen.update(progress)
                    return True
                return False

            h.wait_for(partial, 15)
            assert seen["total"] == big.size and seen["sent"] % 8192 == 0
            via_upgrade = h.upgrade({"command": "upgrade_result", "parameters": {"agents": [1]}})
            assert via_upgrade["data"][0]["progress"]["total"] == big.size
            release.set()
            wait_command(h, a, "upgrade")
            wait_status(h, [1], ["Updating"])
            h.wait_for(lambda: h.result([1])[0]["progress"]["sent"] == big.size, 10)
            assert h.result([1])[0]["progress"] == {"sent": big.size, "total": big.size}
            assert commands(a).count("write") == -(-big.size // 8192)
            writes = [json.loads(p)["parameters"] for t, p in a.received if '"write"' in p]
            assert all(w["length"] == len(base64.b64decode(w["buffer"])) for w in writes)
            assert_signed_wpk(lab, written(a), tmp_path / "received.wpk")
    finally:
        release.set()
