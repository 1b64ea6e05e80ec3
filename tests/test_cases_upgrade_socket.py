"""Black-box cases of categories A and B through the real upgrade socket of a running manager."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
from shared_cases import case

from wpk_upgrade.framing import HEADER, encode
from wpk_upgrade.models import AgentInfo, TaskParams, TaskStatus
from wpk_upgrade.testing.harness import ManagerHarness

A_CASES = ["C001", "C003", "C004", "C005", "C006", "C007", "C008", "C009", "C010"]


def agent(agent_id: int, **kw: Any) -> AgentInfo:
    base: dict[str, Any] = dict(
        name=f"agent{agent_id}",
        version="Wazuh v3.13.1",
        os_platform="ubuntu",
        os_major="18",
        os_minor="04",
        os_arch="x86_64",
        connection_status="active",
        node="node01",
    )
    base.update(kw)
    return AgentInfo(agent_id=agent_id, **base)


def send_case(h: ManagerHarness, c: dict[str, Any]) -> dict[str, Any]:
    inp = c["input"]
    raw = inp["raw"].encode() if "raw" in inp else json.dumps(inp["message"]).encode()
    return h.send_raw("upgrade", raw)


def item(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply["error"] == 0 and reply["message"] == "Success"
    assert len(reply["data"]) == 1
    return reply["data"][0]


@pytest.mark.parametrize("case_id", A_CASES)
def test_parsing_cases_through_socket(harness: ManagerHarness, case_id: str) -> None:
    c = case(case_id)
    assert send_case(harness, c) == c["expected"]["response"]


def test_daemon_keeps_serving_after_garbage(harness: ManagerHarness) -> None:
    """Malformed, truncated and oversized frames get a coded answer; the next request works."""
    path = str(harness.config.upgrade_socket)
    # truncated frame: header announces 100 bytes, 3 arrive, then the client goes away
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(HEADER.pack(100) + b"abc")
    # oversized frame: clear error, not a hang
    big = b"x" * (harness.config.max_message_size + 1)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(encode(big))
        size = HEADER.unpack(s.recv(4))[0]
        data = b""
        while len(data) < size:
            data += s.recv(size - len(data))
    reply = json.loads(data)
    assert reply["error"] == 1 and "exceeds the maximum" in reply["detail"]
    assert harness.send_raw("upgrade", b"\x00\xff garbage") == case("C001")["expected"]["response"]
    harness.seed_agent(agent(1))
    ok = harness.upgrade({"command": "upgrade_result", "parameters": {"agents": [1]}})
    assert ok["data"] == [{"error": 3, "message": "No task in DB", "agent": 1}]


def test_c015_manager_agent(harness: ManagerHarness) -> None:
    c = case("C015")
    assert send_case(harness, c) == c["expected"]["response"]


def test_c016_unknown_agent_listed_before_created(harness: ManagerHarness, tmp_path: Any) -> None:
    c = case("C016")
    harness.seed_agent(agent(1))
    reply = send_case(harness, c)
    expected = c["expected"]["response"]
    assert reply["error"] == 0 and reply["message"] == "Success"
    assert reply["data"][0] == expected["data"][0]
    created = reply["data"][1]
    # The unit test's task id 100 comes from a mocked DB; ours is the first row of a new DB.
    assert created == {**expected["data"][1], "task_id": 1}


@pytest.mark.parametrize("status", ["disconnected", "never_connected", "pending"])
def test_c017_agent_not_active(harness: ManagerHarness, status: str) -> None:
    c = case("C017")
    harness.seed_agent(agent(5, connection_status=status))
    assert send_case(harness, c) == c["expected"]["response"]


@pytest.mark.parametrize(
    "fields",
    [
        {"os_arch": None},
        {"os_minor": None},
        {"os_platform": "centos", "os_major": None},
        {"version": None},
        {"os_platform": None},
        {"version": "3.13.1"},  # no 'v': the reference cannot read it either
    ],
)
def test_c020_missing_agent_data(harness: ManagerHarness, fields: dict[str, Any]) -> None:
    c = case("C020")
    harness.seed_agent(agent(1, **fields))
    got = item(send_case(harness, c))
    assert got == {**c["expected"]["response_item"], "agent": 1}


def test_c021_below_minimum_version(harness: ManagerHarness) -> None:
    c = case("C021")
    harness.seed_agent(agent(1, version="Wazuh v2.1.1"))
    assert item(send_case(harness, c)) == {**c["expected"]["response_item"], "agent": 1}
    custom = harness.upgrade(
        {"command": "upgrade_custom", "parameters": {"agents": [1], "file_path": "/tmp/x.wpk"}}
    )
    assert item(custom)["error"] == 11


def test_c022_macos_below_430(make_harness: Any) -> None:
    c = case("C022")
    h = make_harness(manager_version="v4.3.0")
    h.seed_agent(agent(1, os_platform="darwin", version="Wazuh v4.2.0"))
    assert item(send_case(h, c)) == {**c["expected"]["response_item"], "agent": 1}
    h.seed_agent(agent(2, os_platform="darwin", version="Wazuh v4.3.0"))
    forced = h.upgrade(
        {
            "command": "upgrade",
            "parameters": {"agents": [2], "version": "v4.3.0", "force_upgrade": True},
        }
    )
    assert item(forced)["error"] == 0


def test_c023_target_not_newer(make_harness: Any) -> None:
    c = case("C023")
    h = make_harness(manager_version="v3.13.0")
    h.seed_agent(agent(1, version="Wazuh v3.13.1"))
    assert item(send_case(h, c)) == {**c["expected"]["response_item"], "agent": 1}
    # equal versions fail too (>=)
    same = h.upgrade({"command": "upgrade", "parameters": {"agents": [1], "version": "v3.13.1"}})
    assert item(same)["error"] == 12
    # target above the manager without force: 13
    h.seed_agent(agent(2, version="Wazuh v3.9.1"))
    above = h.upgrade({"command": "upgrade", "parameters": {"agents": [2], "version": "v3.13.1"}})
    assert item(above) == {
        "error": 13,
        "agent": 2,
        "message": (
            "Upgrading an agent to a version higher than the manager requires the force flag"
        ),
    }


def test_c025_force_bypasses_version_checks(make_harness: Any) -> None:
    c = case("C025")
    h = make_harness(manager_version="v3.13.0")
    h.seed_agent(agent(1, version="Wazuh v3.9.1"))
    got = item(send_case(h, c))
    assert got["error"] == 0 and got["message"] == "Success" and got["agent"] == 1
    assert isinstance(got["task_id"], int)
    params = h.store.task_params(got["task_id"])
    assert params is not None and params.version == c["expected"]["resolved_target"]


def test_c027_custom_skips_version_comparisons(make_harness: Any) -> None:
    c = case("C027")
    h = make_harness(manager_version="v3.0.0")
    h.seed_agent(agent(1, version="Wazuh v3.9.1"))
    got = item(send_case(h, c))
    assert got["error"] == 0 and got["message"] == "Success" and isinstance(got["task_id"], int)


@pytest.mark.parametrize("status", [TaskStatus.PENDING, TaskStatus.IN_PROGRESS])
def test_c028_already_upgrading(harness: ManagerHarness, status: TaskStatus) -> None:
    c = case("C028")
    harness.seed_agent(agent(9, connection_status="disconnected"))
    (task,) = harness.store.create_tasks(
        [9], "node01", "upgrade_module", "upgrade", TaskParams(command="upgrade")
    )
    if status is TaskStatus.IN_PROGRESS:
        assert harness.store.set_task_status(task.task_id, "node01", status)
    harness.seed_agent(agent(9))
    assert item(send_case(harness, c)) == c["expected"]["response_item"]


def test_c028_finished_task_allows_new_one(harness: ManagerHarness) -> None:
    harness.seed_agent(agent(9))
    (task,) = harness.store.create_tasks([9], "node01", "upgrade_module", "upgrade")
    harness.store.set_task_status(task.task_id, "node01", TaskStatus.IN_PROGRESS)
    harness.store.set_task_status(task.task_id, "node01", TaskStatus.DONE)
    reply = harness.upgrade(
        {"command": "upgrade_custom", "parameters": {"agents": [9], "file_path": "/nowhere/a.wpk"}}
    )
    assert item(reply)["error"] == 0


def test_duplicate_agent_in_one_request(harness: ManagerHarness) -> None:
    harness.seed_agent(agent(3))
    reply = harness.upgrade(
        {
            "command": "upgrade_custom",
            "parameters": {"agents": [3, 3], "file_path": "/nowhere/a.wpk"},
        }
    )
    assert reply["data"][0] == {
        "error": 10,
        "agent": 3,
        "message": "Upgrade procedure could not start. Agent already upgrading",
    }
    assert reply["data"][1]["error"] == 0


def test_c030_success_envelope(harness: ManagerHarness) -> None:
    c = case("C030")
    harness.seed_agent(agent(1))
    assert send_case(harness, c) == c["expected"]["response"]
