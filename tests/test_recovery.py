"""Restart recovery: after a stop or a ``kill -9``, every task ends final, nothing is lost.

What a restarted node does with what its previous run left (``Manager._recover``):

* queued tasks are resumed (default) or Cancelled (``on_restart = "cancel"``, the reference);
* a task whose push was cut (In progress, installer phase never recorded) is pushed again
  without a second Pending -> In progress, or ends Error with the reason when it cannot be
  (its agent does not come back); in ``cancel`` mode it is left to time out (reference);
* a task whose installer may have started (phase recorded just before the ``upgrade``
  command) is never pushed again: it waits for the agent's report or times out;
* a task already past its timeout times out at start instead of being pushed.

In-process managers (``ManagerHarness``, graceful stop) cover each rule; real manager
processes (``python -m wpk_upgrade.cli manager``) killed with SIGKILL mid-upgrade, on SQLite
and on PostgreSQL, prove the whole: every task final with its history, none in Updating past
its timeout, none dispatched twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from httpfixtures import closed_port
from test_cases_async import (
    SEQUENCE,
    Lab,
    Sim,
    agent_info,
    build_lab,
    commands,
    node_overrides,
    report_params,
)
from wpk_store_sql import SqlTaskStore

from wpk_upgrade.config import ManagerConfig, ManagerConfigSchema, load_data
from wpk_upgrade.framing import request_unix
from wpk_upgrade.interfaces import (
    PHASE_INSTALLING,
    PHASE_QUEUED,
    PHASE_TRANSFERRING,
    TaskFilter,
    TaskStore,
)
from wpk_upgrade.models import TaskStatus
from wpk_upgrade.testing import databases
from wpk_upgrade.testing.harness import ManagerHarness, ScriptedAgent, manager_config

FINAL = {"Updated", "Error", "Cancelled", "Timeout", "Legacy"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    return build_lab(tmp_path_factory.mktemp("lab"))


def settings(lab: Lab, port: int, **overrides: Any) -> dict[str, Any]:
    """Manager settings: the lab repository over file://, agents on a fixed port (so they
    reconnect by themselves across a restart), short timeouts."""
    data = node_overrides(lab, lab.repo.as_uri() + "/", **overrides)
    data["transport"] = {"options": {"listen": f"127.0.0.1:{port}", "heartbeat": 2.0}}
    return data


@contextlib.contextmanager
def node_at(home: Path, lab: Lab, port: int, **overrides: Any) -> Iterator[ManagerHarness]:
    h = ManagerHarness(manager_config(home, **settings(lab, port, **overrides)))
    h.start()
    try:
        yield h
    finally:
        h.stop()


def upgrade(h: Any, agents: list[int]) -> list[dict[str, Any]]:
    reply = h.upgrade({"command": "upgrade", "parameters": {"agents": agents}})
    assert reply["error"] == 0, reply
    items: list[dict[str, Any]] = reply["data"]
    assert all(i["error"] == 0 for i in items), items
    return items


def statuses(h: Any, agents: list[int]) -> list[str]:
    return [i.get("status", "") for i in h.result(agents)]


def wait_statuses(h: Any, agents: list[int], wanted: list[str], timeout: float = 20) -> None:
    h.wait_for(lambda: statuses(h, agents) == wanted, timeout)


def wait_command(h: Any, agent: ScriptedAgent, command: str, n: int = 1) -> None:
    h.wait_for(lambda: commands(agent).count(command) >= n, 20)


def dispatches(store: TaskStore, task_id: int) -> int:
    """How many times a task went Pending -> In progress (must be exactly once)."""
    return sum(
        1
        for c in store.history(task_id)
        if c.from_status is TaskStatus.PENDING and c.to_status is TaskStatus.IN_PROGRESS
    )


def assert_whole_history(store: TaskStore) -> None:
    """Every task: created once, dispatched at most once, history ends at its status."""
    for task in store.list_tasks(TaskFilter(limit=0)):
        history = store.history(task.task_id)
        assert history[0].from_status is None and history[0].to_status is TaskStatus.PENDING
        assert dispatches(store, task.task_id) <= 1, (task, history)
        assert history[-1].to_status is task.status, (task, history)


# =========================================================================== in process


def _four_agents(h: ManagerHarness) -> list[ScriptedAgent]:
    """max_threads 2: agent 1's installer starts, agents 2 and 3 stall at their first
    ``write`` (cut transfers), agent 4 waits In queue."""
    scripts = [Sim(), Sim(stall_at="write", stall_count=1), Sim(stall_at="write", stall_count=1)]
    agents = [ScriptedAgent(h, agent_info(i + 1), s) for i, s in enumerate([*scripts, Sim()])]
    for agent in agents:
        agent.start()
    upgrade(h, [1, 2, 3, 4])
    wait_command(h, agents[0], "upgrade")
    wait_command(h, agents[1], "write")
    wait_command(h, agents[2], "write")
    wait_statuses(h, [1, 2, 3, 4], ["Updating", "Updating", "Updating", "In queue"])
    phases = [h.store.task_phase(t) for t in (1, 2, 3, 4)]
    assert phases == [PHASE_INSTALLING, PHASE_TRANSFERRING, PHASE_TRANSFERRING, PHASE_QUEUED]
    assert [t.task_id for t in h.store.interrupted_transfers("node01")] == [2, 3]
    return agents


def test_resume_pushes_cut_transfers_again_and_never_a_started_installer(
    tmp_path: Path, lab: Lab
) -> None:
    home, port = tmp_path / "m", closed_port()
    opts = {"upgrade": {"max_threads": 2, "command_timeout": 30.0}}
    with contextlib.ExitStack() as stack:
        with node_at(home, lab, port, **opts) as h1:
            agents = _four_agents(h1)
            for agent in agents:
                stack.callback(agent.stop)
        with node_at(home, lab, port, **opts) as h2:
            a1, a2, a3, a4 = agents
            for agent in (a2, a3, a4):
                wait_command(h2, agent, "upgrade")
            assert commands(a2) == ["lock_restart", "open", "write", *SEQUENCE]
            assert commands(a4) == SEQUENCE
            wait_statuses(h2, [1, 2, 3, 4], ["Updating"] * 4)
            assert commands(a1) == SEQUENCE  # its installer had started: not pushed again
            assert [h2.store.task_phase(t) for t in (1, 2, 3, 4)] == [PHASE_INSTALLING] * 4
            for agent in agents:
                assert agent.report(report_params(0))["data"][0]["error"] == 0
            assert statuses(h2, [1, 2, 3, 4]) == ["Updated"] * 4
            for task_id in (1, 2, 3, 4):
                assert dispatches(h2.store, task_id) == 1
                assert [c.to_status for c in h2.store.history(task_id)] == [
                    TaskStatus.PENDING,
                    TaskStatus.IN_PROGRESS,
                    TaskStatus.DONE,
                ]


def test_cancel_mode_is_the_reference_and_nothing_stays_updating(tmp_path: Path, lab: Lab) -> None:
    """``on_restart = "cancel"``: the queued task is Cancelled; the cut transfers are left
    alone and time out; the started installer's late report is still recorded."""
    home, port = tmp_path / "m", closed_port()
    opts = {
        "upgrade": {"max_threads": 2, "command_timeout": 30.0},
        "task_manager": {"on_restart": "cancel", "task_timeout": 4, "sweep_interval": 1},
    }
    with contextlib.ExitStack() as stack:
        with node_at(home, lab, port, **opts) as h1:
            agents = _four_agents(h1)
            for agent in agents:
                stack.callback(agent.stop)
        with node_at(home, lab, port, **opts) as h2:
            assert statuses(h2, [1, 2, 3, 4]) == ["Updating"] * 3 + ["Cancelled"]
            h2.wait_final([1, 2, 3, 4], timeout=15)
            assert statuses(h2, [1, 2, 3, 4]) == ["Timeout"] * 3 + ["Cancelled"]
            assert agents[0].report(report_params(0))["data"][0]["error"] == 0  # D7
            assert statuses(h2, [1, 2, 3, 4]) == ["Updated", "Timeout", "Timeout", "Cancelled"]
            assert [commands(a).count("lock_restart") for a in agents] == [1, 1, 1, 0]
            assert_whole_history(h2.store)


def test_cut_transfer_of_an_agent_that_never_returns_ends_error(tmp_path: Path, lab: Lab) -> None:
    home, port = tmp_path / "m", closed_port()
    opts = {"upgrade": {"command_timeout": 30.0}}
    with node_at(home, lab, port, **opts) as h1:
        a5 = ScriptedAgent(h1, agent_info(5), Sim(stall_at="write"))
        a5.start()
        upgrade(h1, [5])
        wait_command(h1, a5, "write")
    a5.stop()  # after its manager: the push is cut by the stop, not by the agent leaving
    with node_at(home, lab, port, upgrade={"command_timeout": 1.0}) as h2:
        (item,) = h2.wait_final([5], timeout=15)
        assert (item["status"], item["error_msg"]) == ("Error", "Send lock restart error")
        assert h2.store.history(1)[-1].reason == "agent is not connected"
        assert dispatches(h2.store, 1) == 1


def test_task_past_its_timeout_at_restart_times_out_instead_of_being_pushed(
    tmp_path: Path, lab: Lab
) -> None:
    home, port = tmp_path / "m", closed_port()
    with contextlib.ExitStack() as stack:
        with node_at(home, lab, port, upgrade={"command_timeout": 30.0}) as h1:
            a6 = ScriptedAgent(h1, agent_info(6), Sim(stall_at="write", stall_count=1))
            a6.start()
            stack.callback(a6.stop)
            upgrade(h1, [6])
            wait_command(h1, a6, "write")
        time.sleep(2.2)
        short = {"task_manager": {"task_timeout": 2, "sweep_interval": 1}}
        with node_at(home, lab, port, **short) as h2:
            assert statuses(h2, [6]) == ["Timeout"]  # at start-up, before any push
            time.sleep(0.5)
            assert commands(a6).count("lock_restart") == 1


def test_other_nodes_cut_transfers_are_not_taken_over(tmp_path: Path, lab: Lab) -> None:
    """A node only recovers its own tasks: node02 on the same store leaves node01's cut
    transfer alone; node01, back, pushes it again."""
    home, port = tmp_path / "m", closed_port()
    opts = {"upgrade": {"command_timeout": 30.0}}
    with contextlib.ExitStack() as stack:
        with node_at(home, lab, port, **opts) as h1:
            a7 = ScriptedAgent(h1, agent_info(7), Sim(stall_at="write", stall_count=1))
            a7.start()
            stack.callback(a7.stop)
            upgrade(h1, [7])
            wait_command(h1, a7, "write")
        with node_at(home, lab, port, node_name="node02", **opts) as h2:
            h2.wait_for(lambda: h2.manager is not None and h2.manager.hub.link(7) is not None)
            time.sleep(0.5)
            assert commands(a7).count("lock_restart") == 1
            assert statuses(h2, [7]) == ["Updating"]
        with node_at(home, lab, port, **opts) as h3:
            wait_command(h3, a7, "upgrade")
            assert dispatches(h3.store, 1) == 1


# =========================================================================== real processes


class ManagerProcess:
    """A real ``python -m wpk_upgrade.cli manager --config FILE`` process.

    Offers what ``ScriptedAgent`` needs of a harness (``config``, ``transport_address``,
    ``wait_for``) and the socket helpers tests use; its store is read through its own
    ``SqlTaskStore`` on the same database.
    """

    manager = None  # ScriptedAgent.start(wait=True) looks here; use wait=False

    def __init__(self, home: Path, port: int, data: dict[str, Any]) -> None:
        self.home = home
        self.port = port
        home.mkdir(parents=True, exist_ok=True)
        self.path = home / "manager.toml"
        self.path.write_text(_toml({"home": str(home), **data}))
        self.config: ManagerConfig = load_data({"home": str(home), **data}, ManagerConfigSchema())
        self.log = home / "manager.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.store = SqlTaskStore(self.config.store_url)

    @property
    def transport_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "wpk_upgrade.cli", "manager", "--config", str(self.path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_for(self._serving, 30)
        self.store.open()

    def _serving(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"manager exited {self.proc.returncode}: {self.log.read_text()}")
        try:
            self.result([0])
        except OSError:
            return False
        return True

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.store.close()

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.store.close()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"condition not reached in time; log:\n{self.log.read_text()[-3000:]}")

    def _send(self, path: Path, message: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = json.loads(request_unix(str(path), json.dumps(message).encode()))
        return reply

    def upgrade(self, message: dict[str, Any]) -> dict[str, Any]:
        return self._send(self.config.upgrade_socket, message)

    def result(self, agents: list[int]) -> list[dict[str, Any]]:
        message = {
            "origin": {"module": "api"},
            "command": "upgrade_result",
            "parameters": {"agents": agents},
        }
        items: list[dict[str, Any]] = self._send(self.config.task_socket, message)["data"]
        return items

    def connected(self, *agent_ids: int) -> bool:
        found = self.store.get_agents(list(agent_ids))
        return all(
            a in found
            and found[a].connection_status == "active"
            and found[a].node == self.config.node_name
            for a in agent_ids
        )


def _toml(data: dict[str, Any]) -> str:
    """A TOML document of plain tables, strings, numbers and booleans."""
    top = [f"{k} = {json.dumps(v)}" for k, v in data.items() if not isinstance(v, dict)]
    tables = []
    for name, table in data.items():
        if isinstance(table, dict):
            tables.append(f"\n[{name}]")
            for key, value in table.items():
                if isinstance(value, dict):
                    inline = ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items())
                    tables.append(f"{key} = {{ {inline} }}")
                else:
                    tables.append(f"{key} = {json.dumps(value)}")
    return "\n".join(top + tables) + "\n"


# Agents of the kill -9 scenario (max_threads 3, requested in this order):
INSTALLED = [1, 2]  # installer started before the kill; report after the restart
SILENT = [3]  # installer started; never reports: Timeout
CUT = [4, 5]  # stalled at their first write when killed: pushed again, then report
DEAD = [6]  # never answers lock_restart: pushed again, fails (Error) after the restart
QUEUED = [7, 8]  # In queue when killed: resumed, then report
ALL = INSTALLED + SILENT + CUT + DEAD + QUEUED
TASK_TIMEOUT = 14


def _script(agent_id: int) -> Sim:
    if agent_id in CUT:
        return Sim(stall_at="write", stall_count=1)
    if agent_id in DEAD:
        return Sim(stall_at="lock_restart")
    return Sim()


def kill9_scenario(tmp: Path, lab: Lab, store_url: str | None) -> None:
    port = closed_port()
    data = settings(
        lab,
        port,
        upgrade={"max_threads": 3, "command_timeout": 2.0},
        task_manager={"task_timeout": TASK_TIMEOUT, "sweep_interval": 1, "poll_interval": 0.2},
    )
    if store_url is not None:
        data["store"] = {"url": store_url}
    node = ManagerProcess(tmp / "m", port, data)
    agents: dict[int, ScriptedAgent] = {}
    try:
        node.start()
        for agent_id in ALL:
            agents[agent_id] = ScriptedAgent(node, agent_info(agent_id), _script(agent_id))  # type: ignore[arg-type]
            agents[agent_id].start(wait=False)
        node.wait_for(lambda: node.connected(*ALL))
        t0 = time.time()
        upgrade(node, ALL)
        for agent_id in INSTALLED + SILENT:
            wait_command(node, agents[agent_id], "upgrade")
        for agent_id in CUT:
            wait_command(node, agents[agent_id], "write")
        wait_command(node, agents[DEAD[0]], "lock_restart")
        wait_statuses(node, ALL, ["Updating"] * 6 + ["In queue"] * 2)

        node.kill9()
        node.start()

        for agent_id in CUT + QUEUED:
            wait_command(node, agents[agent_id], "upgrade")
        for agent_id in INSTALLED + CUT + QUEUED:
            node.wait_for(lambda a=agent_id: node.connected(a))
            reply = agents[agent_id].report(report_params(0))
            assert reply["data"][0]["error"] == 0, (agent_id, reply)
        # Nothing stays Updating past its timeout (+ one sweep and some slack).
        node.wait_for(
            lambda: set(statuses(node, ALL)) <= FINAL,
            max(1.0, t0 + TASK_TIMEOUT + 4 - time.time()),
        )
        items = node.result(ALL)
        got = {i["agent"]: (i["status"], i.get("error_msg")) for i in items}
        for agent_id in INSTALLED + CUT + QUEUED:
            assert got[agent_id] == ("Updated", None), (agent_id, got)
        assert got[SILENT[0]][0] == "Timeout"
        assert got[DEAD[0]] == ("Error", "Send lock restart error")
        # Nothing lost: one task per agent, ids 1..8, each with its whole history;
        # dispatched exactly once; started installers never pushed again.
        assert sorted(i["task_id"] for i in items) == list(range(1, len(ALL) + 1))
        assert_whole_history(node.store)
        for item in items:
            assert dispatches(node.store, item["task_id"]) == 1
        lock_restarts = {a: commands(s).count("lock_restart") for a, s in agents.items()}
        assert [lock_restarts[a] for a in INSTALLED + SILENT] == [1, 1, 1]
        assert [lock_restarts[a] for a in CUT] == [2, 2]
        assert lock_restarts[DEAD[0]] == 2
        assert [lock_restarts[a] for a in QUEUED] == [1, 1]
    finally:
        for agent in agents.values():
            agent.stop()
        node.terminate()


def test_kill9_mid_upgrades_sqlite(tmp_path_factory: pytest.TempPathFactory, lab: Lab) -> None:
    kill9_scenario(tmp_path_factory.mktemp("k"), lab, None)


def test_kill9_mid_upgrades_postgresql(tmp_path_factory: pytest.TempPathFactory, lab: Lab) -> None:
    server = databases.server_or_skip(databases.POSTGRESQL)
    with databases.temporary_database(server, prefix="wpk_recovery") as url:
        kill9_scenario(tmp_path_factory.mktemp("k"), lab, url)


def test_jobs_already_in_progress_go_first(tmp_path: Path) -> None:
    """Claimed and resumed tasks (In progress: their timeout runs) are started before the
    queued Pending ones, in order within each kind."""
    from wpk_upgrade.daemon import Manager

    dispatcher = Manager(manager_config(tmp_path / "m")).dispatcher
    dispatcher.submit(5)
    dispatcher.submit(6)
    dispatcher.resume(7)
    dispatcher.resume(8)
    order = [dispatcher.queue.get_nowait()[2] for _ in range(4)]
    assert [(j.task_id, j.claimed) for j in order] == [(7, True), (8, True), (5, False), (6, False)]
