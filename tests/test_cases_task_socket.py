"""Black-box cases of category F through the real task socket of a running manager."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from shared_cases import case

from wpk_upgrade.models import REFERENCE_STATUS_TEXT, TaskStatus
from wpk_upgrade.testing.harness import ManagerHarness

TIME = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d$")


def send_case(h: ManagerHarness, c: dict[str, Any]) -> dict[str, Any]:
    inp = c["input"]
    raw = inp["raw"].encode() if "raw" in inp else json.dumps(inp["message"]).encode()
    return h.send_raw("task", raw)


@pytest.mark.parametrize("case_id", ["C069", "C072", "C073", "C074", "C075"])
def test_task_socket_refusals(harness: ManagerHarness, case_id: str) -> None:
    c = case(case_id)
    assert send_case(harness, c) == c["expected"]["response"]


def test_c074_empty_array(harness: ManagerHarness) -> None:
    msg = {
        "origin": {"name": "node05", "module": "api"},
        "command": "upgrade_result",
        "parameters": {"agents": []},
    }
    assert harness.task(msg) == case("C074")["expected"]["response"]


def test_c076_create_tasks(harness: ManagerHarness) -> None:
    c = case("C076")
    assert send_case(harness, c) == c["expected"]["response"]
    for task_id in (1, 2):
        task = harness.store.get_task(task_id)
        assert task is not None
        assert (task.status, task.node, task.module, task.command) == (
            TaskStatus.PENDING,
            "node05",
            "upgrade_module",
            "upgrade",
        )


def _create(h: ManagerHarness, agent: int, node: str = "node02") -> None:
    h.task(
        {
            "origin": {"name": node, "module": "upgrade_module"},
            "command": "upgrade",
            "parameters": {"agents": [agent]},
        }
    )


def _update(
    h: ManagerHarness, agent: int, status: str, node: str = "node02", **extra: Any
) -> dict[str, Any]:
    return h.task(
        {
            "origin": {"name": node, "module": "upgrade_module"},
            "command": "upgrade_update_status",
            "parameters": {"agents": [agent], "status": status, **extra},
        }
    )


def test_c078_update_status(harness: ManagerHarness) -> None:
    c = case("C078")
    _create(harness, 35)
    assert _update(harness, 35, "In progress")["data"] == [
        {"error": 0, "message": "Success", "agent": 35}
    ]
    reply = send_case(harness, c)
    assert reply["data"] == [c["expected"]["response_item"]]
    # Done -> Done is refused: "No task in DB"
    assert _update(harness, 35, "Done")["data"] == [
        {"error": 3, "message": "No task in DB", "agent": 35}
    ]
    # a status that cannot be requested is a database error (reference -1)
    assert _update(harness, 35, "Timeout") == {
        "error": 4,
        "data": [{"error": 4, "message": "Database error"}],
        "message": "Database error",
    }


def test_c081_result_with_task(harness: ManagerHarness) -> None:
    c = case("C081")
    _create(harness, 35, node="node01")
    _update(harness, 35, "In progress", node="node01", error_msg="Error string")
    reply = send_case(harness, c)
    assert reply["error"] == 0 and reply["message"] == "Success"
    (got,) = reply["data"]
    expected = c["expected"]["response_item"]
    for key in ("error", "message", "agent", "node", "module", "command", "status", "error_msg"):
        assert got[key] == expected[key], key
    assert isinstance(got["task_id"], int)
    assert TIME.match(got["create_time"]) and TIME.match(got["update_time"])


def test_update_time_is_zero_until_first_update(harness: ManagerHarness) -> None:
    """Decision D2: ``update_time`` is "0" until the first update."""
    _create(harness, 7)
    (got,) = harness.result([7])
    assert got["update_time"] == "0" and got["status"] == "In queue" and "error_msg" not in got


def test_c082_no_task(harness: ManagerHarness) -> None:
    c = case("C082")
    assert send_case(harness, c) == c["expected"]["response"]


def test_c083_status_translation() -> None:
    """The reference shows long sentences as the status; decision D10 shows the short word
    and moves the sentence to ``error_msg`` (the design wins over the case)."""
    c = case("C083")
    short = {
        "Pending": "In queue",
        "In progress": "Updating",
        "Done": "Updated",
        "Failed": "Error",
        "Cancelled": "Cancelled",
        "Timeout": "Timeout",
        "Legacy": "Legacy",
    }
    for raw, reference_text in c["expected"].items():
        if reference_text is None:
            with pytest.raises(ValueError):
                TaskStatus(raw)
            continue
        status = TaskStatus(raw)
        assert status.display == short[raw]
        assert REFERENCE_STATUS_TEXT[status] == reference_text
        if status.display != reference_text:
            assert status.sentence == reference_text


def test_c084_cancel_pending_of_node(harness: ManagerHarness) -> None:
    c = case("C084")
    _create(harness, 1)
    _create(harness, 2)
    _update(harness, 2, "In progress")
    _create(harness, 3, node="node09")
    assert send_case(harness, c) == c["expected"]["response"]
    one, two, three = harness.result([1, 2, 3])
    assert one["status"] == "Cancelled"
    assert one["error_msg"] == "Task cancelled since the manager was restarted"
    assert two["status"] == "Updating"
    assert three["status"] == "In queue"


def test_c085_timeout_and_cleanup(harness: ManagerHarness) -> None:
    """task_timeout 850 s, cleanup_time 1000 s (as in the case), driven with explicit clocks."""
    import dataclasses

    from wpk_upgrade.models import now

    assert harness.manager is not None
    tm = harness.manager.tasks
    tm.settings = dataclasses.replace(tm.settings, task_timeout=850, cleanup_time=1000)
    _create(harness, 1)
    _update(harness, 1, "In progress")
    t0 = now()
    # not yet expired
    harness.run(tm.sweep_once(t0 + 849))
    assert harness.result([1])[0]["status"] == "Updating"
    deadline = harness.run(tm.sweep_once(t0 + 851))
    (got,) = harness.result([1])
    assert got["status"] == "Timeout"
    assert got["error_msg"].startswith("Timeout reached while waiting for the response")
    assert deadline >= t0 + 851
    # cleanup: tasks created at or before now - cleanup_time are deleted
    assert harness.store.delete_old(t0 + 5) >= 1
    assert harness.result([1])[0] == {"error": 3, "message": "No task in DB", "agent": 1}
