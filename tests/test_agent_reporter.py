"""Result reporting after a restart (reference §6.5, §7.6; case C114 from the agent's side).

``RecordingManager`` is a real ``ManagerChannel`` that plays the manager: it records every
event with its time and, when told to, answers the way the manager does, by sending
``clear_upgrade_result`` back through the agent's command handler. The last test runs the whole
agent daemon against a real manager node over the tcp transport.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from wpk_upgrade.agent.commands import CommandHandler
from wpk_upgrade.agent.config import AgentConfig, AgentConfigSchema
from wpk_upgrade.agent.daemon import AgentDaemon
from wpk_upgrade.agent.reporter import ResultReporter
from wpk_upgrade.agent.result import (
    EMPTY_FILE_OUTCOME,
    OUTCOMES,
    ResultState,
    UpgradeGate,
    parse_result,
    read_result,
)
from wpk_upgrade.config import load_data
from wpk_upgrade.interfaces import ManagerChannel
from wpk_upgrade.models import AgentInfo, TaskStatus
from wpk_upgrade.testing.harness import ManagerHarness, manager_config

CLEAR = '{"command":"clear_upgrade_result","parameters":{}}'


@pytest.fixture
def home() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="wpkr-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_config(home: Path, manager: dict[str, Any] | None = None, **upgrade: Any) -> AgentConfig:
    settings = {
        "result_wait": 0.1,
        "notification_wait_start": 0.05,
        "notification_wait_max": 0.2,
        "notification_wait_factor": 2.0,
        **upgrade,
    }
    data: dict[str, Any] = {"home": str(home), "agent": {"id": 5}, "upgrade": settings}
    if manager is not None:
        data["manager"] = manager
    config: AgentConfig = load_data(data, AgentConfigSchema(), "test")
    for directory in config.layout_dirs():
        directory.mkdir(parents=True, exist_ok=True)
    return config


class RecordingManager(ManagerChannel):
    """Records events; clears the agent's result after ``clear_after`` events (None: never)."""

    def __init__(self, handler: CommandHandler, clear_after: int | None = 1) -> None:
        self.handler = handler
        self.clear_after = clear_after
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.fail_with: BaseException | None = None

    async def send_event(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        if self.fail_with is not None:
            raise self.fail_with
        self.events.append((time.monotonic(), message))
        if self.clear_after is not None and len(self.events) >= self.clear_after:
            await self.handler.handle("upgrade", CLEAR)
        return {"error": 0, "data": [{"error": 0, "message": "Success", "agent": 5}]}

    def gaps(self) -> list[float]:
        times = [t for t, _ in self.events]
        return [b - a for a, b in pairwise(times)]


class Agent:
    """The parts of the agent that reporting involves."""

    def __init__(self, config: AgentConfig, **reporter: Any) -> None:
        self.gate = UpgradeGate()
        self.handler = CommandHandler(config, self.gate)
        self.reporter = ResultReporter(config, self.gate, **reporter)


def run(coro: Any, timeout: float = 20) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "state", "code"),
    [
        ("0", ResultState.VALUE, 0),
        ("1\n", ResultState.VALUE, 1),
        ("  2 trailing words", ResultState.VALUE, 2),
        ("0\r\n", ResultState.VALUE, 0),
        ("", ResultState.EMPTY, None),
        (" \n\t", ResultState.EMPTY, None),
        ("10", ResultState.INVALID, None),  # the reference counted "10" as success (§11.15)
        ("3", ResultState.INVALID, None),
        ("ok", ResultState.INVALID, None),
        ("x0", ResultState.INVALID, None),
        (" " * 19 + "0", ResultState.EMPTY, None),  # only the first 19 characters count
    ],
)
def test_parse_result(text: str, state: ResultState, code: int | None) -> None:
    read = parse_result(text)
    assert read.state is state
    assert (read.outcome.error if read.outcome else None) == code


def test_read_result_missing_and_unreadable(home: Path) -> None:
    assert read_result(home / "nope").state is ResultState.MISSING
    (home / "dir").mkdir()
    assert read_result(home / "dir").state is ResultState.INVALID


# --------------------------------------------------------------------------- reporting


@pytest.mark.parametrize(
    ("value", "params"),
    [
        ("0", {"error": 0, "message": "Upgrade was successful", "status": "Done"}),
        ("1", {"error": 1, "message": "Upgrade failed due missing dependency", "status": "Failed"}),
        ("2", {"error": 2, "message": "Upgrade failed", "status": "Failed"}),
    ],
)
def test_result_is_reported_until_cleared(home: Path, value: str, params: dict[str, Any]) -> None:
    config = make_config(home, result_wait=0.3)
    config.result_file.write_text(value)
    agent = Agent(config)
    manager = RecordingManager(agent.handler, clear_after=1)

    async def scenario() -> float:
        task = asyncio.create_task(agent.reporter.run())
        await asyncio.sleep(0.1)
        assert manager.events == []  # not connected yet: nothing sent
        connected = time.monotonic()
        agent.reporter.connected(manager)
        await task
        return connected

    connected = run(scenario())
    assert [m for _, m in manager.events] == [
        {"command": "upgrade_update_status", "parameters": params}
    ]
    assert manager.events[0][0] - connected >= 0.3  # result_wait after connecting
    assert not config.result_file.exists()
    assert agent.gate.allowed


def test_backoff_grows_by_factor_up_to_max(home: Path) -> None:
    config = make_config(
        home,
        notification_wait_start=0.05,
        notification_wait_factor=2.0,
        notification_wait_max=0.2,
    )
    config.result_file.write_text("2")
    agent = Agent(config)
    manager = RecordingManager(agent.handler, clear_after=6)

    async def scenario() -> None:
        agent.reporter.connected(manager)
        await agent.reporter.run()

    run(scenario())
    assert len(manager.events) == 6
    assert {m["parameters"]["error"] for _, m in manager.events} == {2}
    expected = [0.05, 0.1, 0.2, 0.2, 0.2]
    for gap, want in zip(manager.gaps(), expected, strict=True):
        assert want * 0.9 <= gap < want + 0.15, (manager.gaps(), expected)
    assert agent.gate.allowed and not config.result_file.exists()


def test_fractional_factor(home: Path) -> None:
    config = make_config(
        home,
        notification_wait_start=0.1,
        notification_wait_factor=1.5,
        notification_wait_max=1.0,
    )
    config.result_file.write_text("0")
    agent = Agent(config)
    manager = RecordingManager(agent.handler, clear_after=4)

    async def scenario() -> None:
        agent.reporter.connected(manager)
        await agent.reporter.run()

    run(scenario())
    for gap, want in zip(manager.gaps(), [0.1, 0.15, 0.225], strict=True):
        assert want * 0.9 <= gap < want + 0.1, manager.gaps()


def test_clear_ends_the_pause_at_once(home: Path) -> None:
    """The manager's clear_upgrade_result may come later than its event reply; the reporter
    does not sleep out its (long) pause once upgrades are allowed."""
    config = make_config(home, notification_wait_start=30, notification_wait_max=60)
    config.result_file.write_text("0")
    agent = Agent(config)
    manager = RecordingManager(agent.handler, clear_after=None)

    async def scenario() -> float:
        agent.reporter.connected(manager)
        task = asyncio.create_task(agent.reporter.run())
        while not manager.events:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert not task.done()
        started = time.monotonic()
        assert await agent.handler.handle("upgrade", CLEAR) == (
            '{"error":0,"message":"ok","data":[]}'
        )
        await task
        return time.monotonic() - started

    assert run(scenario()) < 1
    assert len(manager.events) == 1


def test_no_result_file_allows_upgrades(home: Path) -> None:
    config = make_config(home, result_wait=0.2)
    agent = Agent(config)
    manager = RecordingManager(agent.handler)

    async def scenario() -> float:
        agent.reporter.connected(manager)
        started = time.monotonic()
        await agent.reporter.run()
        return time.monotonic() - started

    assert run(scenario()) >= 0.2
    assert manager.events == []
    assert agent.gate.allowed


@pytest.mark.parametrize("content", ["10", "garbage", "3"])
def test_invalid_result_is_ignored_and_upgrades_allowed(home: Path, content: str) -> None:
    config = make_config(home)
    config.result_file.write_text(content)
    agent = Agent(config)
    manager = RecordingManager(agent.handler)

    async def scenario() -> None:
        agent.reporter.connected(manager)
        await agent.reporter.run()

    run(scenario())
    assert manager.events == []
    assert agent.gate.allowed
    assert config.result_file.exists()


def test_empty_result_written_late_is_reported(home: Path) -> None:
    config = make_config(home, result_wait=0.1)
    config.result_file.write_text("")
    agent = Agent(config, empty_grace=2.0)
    manager = RecordingManager(agent.handler)

    async def scenario() -> None:
        agent.reporter.connected(manager)
        task = asyncio.create_task(agent.reporter.run())
        await asyncio.sleep(0.4)
        assert manager.events == []
        config.result_file.write_text("1")
        await task

    run(scenario())
    assert [m["parameters"] for _, m in manager.events] == [OUTCOMES[1].parameters()]


def test_empty_result_becomes_a_failure_after_grace(home: Path) -> None:
    """The reference waited for an empty file forever and never allowed upgrades (§11.15)."""
    config = make_config(home, result_wait=0.1)
    config.result_file.write_text("")
    agent = Agent(config)  # grace defaults to result_wait
    manager = RecordingManager(agent.handler)

    async def scenario() -> float:
        agent.reporter.connected(manager)
        started = time.monotonic()
        await agent.reporter.run()
        return manager.events[0][0] - started

    elapsed = run(scenario())
    assert elapsed >= 0.2  # result_wait + grace
    assert [m["parameters"] for _, m in manager.events] == [EMPTY_FILE_OUTCOME.parameters()]
    assert EMPTY_FILE_OUTCOME.parameters() == {
        "error": 2,
        "message": "Upgrade failed: empty result file",
        "status": "Failed",
    }
    assert agent.gate.allowed and not config.result_file.exists()


def test_disabled_module_skips_the_check(home: Path) -> None:
    config = make_config(home, enabled=False)
    config.result_file.write_text("0")
    agent = Agent(config)
    manager = RecordingManager(agent.handler)

    async def scenario() -> None:
        agent.reporter.connected(manager)
        await agent.reporter.run()
        await asyncio.sleep(0.3)

    run(scenario())
    assert manager.events == []
    assert not agent.gate.allowed
    assert config.result_file.exists()


def test_reports_resume_after_reconnect(home: Path) -> None:
    config = make_config(home, notification_wait_start=5, notification_wait_max=10)
    config.result_file.write_text("0")
    agent = Agent(config)
    first = RecordingManager(agent.handler, clear_after=None)
    second = RecordingManager(agent.handler, clear_after=1)

    async def scenario() -> float:
        agent.reporter.connected(first)
        task = asyncio.create_task(agent.reporter.run())
        while not first.events:
            await asyncio.sleep(0.01)
        # the connection breaks during the 5 s pause; a new one comes up
        first.fail_with = ConnectionError("connection reset")
        agent.reporter.disconnected(first)
        await asyncio.sleep(0.1)
        reconnected = time.monotonic()
        agent.reporter.connected(second)
        await task
        return second.events[0][0] - reconnected

    assert run(scenario()) < 0.5  # sent at once on the new connection, not after the pause
    assert len(first.events) == 1 and len(second.events) == 1
    assert agent.gate.allowed


def test_send_failure_waits_for_the_next_connection(home: Path) -> None:
    config = make_config(home)
    config.result_file.write_text("2")
    agent = Agent(config)
    broken = RecordingManager(agent.handler)
    broken.fail_with = ConnectionResetError("gone")
    good = RecordingManager(agent.handler)

    async def scenario() -> None:
        agent.reporter.connected(broken)
        task = asyncio.create_task(agent.reporter.run())
        await asyncio.sleep(0.5)
        assert not task.done() and not agent.gate.allowed
        agent.reporter.connected(good)
        await task

    run(scenario())
    assert len(good.events) == 1 and agent.gate.allowed


def test_unacknowledged_report_is_retried_on_the_same_connection(home: Path) -> None:
    """A manager that does not answer in time (TimeoutError, itself an OSError) is not a lost
    connection: the report is simply sent again after the pause."""
    config = make_config(home)
    config.result_file.write_text("0")
    agent = Agent(config)

    class SlowManager(RecordingManager):
        async def send_event(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
            if not self.events:
                self.events.append((time.monotonic(), message))
                raise TimeoutError
            return await super().send_event(message, timeout)

    manager = SlowManager(agent.handler, clear_after=2)

    async def scenario() -> None:
        agent.reporter.connected(manager)
        await agent.reporter.run()

    run(scenario())
    assert len(manager.events) == 2 and agent.gate.allowed


# --------------------------------------------------------------------------- real manager


def test_report_to_a_real_manager_over_tcp(home: Path, tmp_path: Path) -> None:
    """C114 end to end: agent 5's task is In progress; the restarted agent finds result 0,
    reports it over the tcp transport, the manager marks the task Done and sends
    clear_upgrade_result, which removes the file and allows upgrades."""
    with ManagerHarness(manager_config(tmp_path / "manager")) as harness:
        harness.seed_agent(
            AgentInfo(
                agent_id=5, version="v4.8.0", os_platform="ubuntu", connection_status="active"
            )
        )
        (task,) = harness.store.create_tasks([5], "node01", "upgrade_module", "upgrade")
        assert harness.store.set_task_status(task.task_id, "node01", TaskStatus.IN_PROGRESS)
        options = {"address": harness.transport_address, "heartbeat": 2.0, "reconnect_min": 0.05}
        config = make_config(home, manager={"transport": "tcp", "options": options})
        config.result_file.write_text("0")
        config.version_file.write_text("v4.9.0\n")
        daemon = AgentDaemon(config)

        async def scenario() -> None:
            running = asyncio.create_task(daemon.run())
            while not daemon.gate.allowed:
                await asyncio.sleep(0.05)
            assert config.state_file.read_text() == "status=connected\n"
            daemon.request_stop()
            assert await running == 0

        run(scenario())
        assert not config.result_file.exists()
        assert config.state_file.read_text() == "status=disconnected\n"
        (item,) = harness.result([5])
        assert item["status"] == "Updated"
        assert harness.store.get_agent(5).version == "v4.9.0"  # type: ignore[union-attr]
