"""``upgrade_cancel`` (``wpk-upgrade cancel``) never hides an upgrade whose installer started.

Once the dispatcher has recorded the installer phase (just before it sends ``upgrade``) the
store refuses In progress -> Cancelled: the cancel answers error 8 "Task is already being
installed, cannot be cancelled" for that agent, and the task goes on to the agent's report.
A task cancelled before that point is never sent ``upgrade``. The store's atomicity between
the two is pinned down by the store contract (``test_race_cancel_against_installer_phase``).

The first test runs everything as real processes: a manager, an agent installing a real
signed WPK whose installer waits for the test's go-ahead before it restarts the agent, and
the CLI commands.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from wpk_upgrade import pki, wpk
from wpk_upgrade.framing import request_unix
from wpk_upgrade.models import AgentInfo
from wpk_upgrade.testing.harness import ManagerHarness, ScriptedAgent, json_agent, wait_until

CLI = [sys.executable, "-m", "wpk_upgrade.cli"]
REFUSED = "Task is already being installed, cannot be cancelled"

# Like the reference upgrade.sh: detaches and exits 0 at once. The background part waits for
# the test's go-ahead (the file "go" in the agent's home), writes a successful result and
# restarts the agent (SIGHUP), whose reporter then sends the result to the manager.
INSTALLER = r"""#!/bin/sh
home="${WPK_AGENT_HOME:?WPK_AGENT_HOME not set}"
: > "$home/installer.started"
(
  i=0
  while [ ! -f "$home/go" ] && [ "$i" -lt 2400 ]; do sleep 0.05; i=$((i + 1)); done
  printf 0 > "$home/var/upgrade/upgrade_result"
  kill -HUP "$(cat "$home/var/run/agent.pid")"
) > /dev/null 2>&1 < /dev/null &
exit 0
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 90) -> None:
    wait_until(predicate, what, timeout)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=90)


def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


def result_of(home: Path, agent: int) -> dict[str, Any]:
    message = {
        "origin": {"module": "api"},
        "command": "upgrade_result",
        "parameters": {"agents": [agent]},
    }
    path = str(home / "queue" / "tasks" / "task")
    reply: dict[str, Any] = json.loads(request_unix(path, json.dumps(message).encode()))
    item: dict[str, Any] = reply["data"][0]
    return item


def serving(home: Path) -> bool:
    try:
        result_of(home, 5)
    except OSError:
        return False
    return True


@pytest.fixture
def lab(tmp_path: Path) -> dict[str, Path]:
    """A WPK CA and a signed ``upgrade_custom`` WPK whose installer is ``INSTALLER``."""
    ca = pki.create_ca(tmp_path / "ca")
    signer = pki.issue_certificate(ca.cert, ca.key, tmp_path / "signer", "wpk signer", "code")
    src = tmp_path / "src"
    src.mkdir()
    (src / "upgrade.sh").write_text(INSTALLER)
    (src / "package.bin").write_bytes(os.urandom(32 * 1024))
    out = tmp_path / "custom.wpk"
    wpk.pack(out, signer.cert, signer.key, [src / "upgrade.sh", src / "package.bin"])
    return {"ca": Path(ca.cert), "wpk": out}


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in reversed(started):
        stop(proc)


def test_cancel_after_the_installer_started_is_refused_and_the_report_is_kept(
    tmp_path: Path, lab: dict[str, Path], procs: list[subprocess.Popen[bytes]]
) -> None:
    port = free_port()
    home = tmp_path / "manager"
    home.mkdir()
    config = home / "manager.toml"
    config.write_text(
        f'home = "{home}"\n[transport]\nname = "tcp"\n'
        f'options = {{ listen = "127.0.0.1:{port}", heartbeat = 2.0 }}\n'
    )
    procs.append(start([*CLI, "manager", "--config", str(config)], home / "manager.log"))
    wait_for(lambda: serving(home), "the manager serving")

    agent_home = tmp_path / "agent"
    (agent_home / "etc").mkdir(parents=True)
    (agent_home / "etc" / "version").write_text("v4.8.0\n")
    agent_config = agent_home / "etc" / "agent.toml"
    agent_config.write_text(
        f'home = "{agent_home}"\n'
        '[agent]\nid = 5\nname = "web-5"\nos_platform = "ubuntu"\nos_major = "22"\n'
        'os_minor = "04"\nos_arch = "x86_64"\n'
        '[manager]\ntransport = "tcp"\n'
        f'options = {{ address = "127.0.0.1:{port}", reconnect_min = 0.05, '
        "reconnect_max = 0.5, heartbeat = 2.0 }\n"
        '[upgrade]\nresult_wait = 0.2\nnotification_wait_start = "1s"\n'
        f'[upgrade.ca_verification]\nenabled = true\nca_store = ["{lab["ca"]}"]\n'
    )
    agent_log = agent_home / "agent.log"
    procs.append(
        start([sys.executable, "-m", "wpk_upgrade.agent", "--config", str(agent_config)], agent_log)
    )
    state = agent_home / "var" / "run" / "agent.state"
    wait_for(lambda: state.is_file() and "status=connected" in state.read_text(), "agent up")
    wait_for(lambda: run("agents", "5", "--json", "--home", str(home)).returncode == 0, "known")

    proc = run("upgrade-custom", "5", "--file", str(lab["wpk"]), "--home", str(home))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "agent 005: task 1 created"
    # The installer runs on the agent: the manager sent ``upgrade``.
    wait_for(lambda: (agent_home / "installer.started").exists(), "the installer started")

    proc = run("cancel", "5", "--home", str(home))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.strip() == f"agent 005: task 1 not cancelled ({REFUSED})"
    proc = run("cancel", "5", "--json", "--home", str(home))
    assert proc.returncode == 1
    assert json.loads(proc.stdout) == [{"error": 8, "message": REFUSED, "agent": 5, "task_id": 1}]
    item = result_of(home, 5)
    assert (item["task_id"], item["status"]) == (1, "Updating")

    (agent_home / "go").touch()  # the installer goes on: restart, then the agent's report
    proc = run("watch", "5", "--plain", "--json", "--interval", "0.2", "--home", str(home))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (item,) = json.loads(proc.stdout)
    assert (item["task_id"], item["status"]) == (1, "Updated")
    assert "error_msg" not in item
    # The report was acknowledged (the agent was told to clear its result), not refused.
    result_file = agent_home / "var" / "upgrade" / "upgrade_result"
    wait_for(lambda: not result_file.exists(), "the agent's result cleared")
    history = json.loads(run("history", "1", "--json", "--home", str(home)).stdout)
    assert [h["to"] for h in history] == ["In queue", "Updating", "Updated"], history
    log = (home / "manager.log").read_text()
    assert "installer started on agent 005" in log
    assert "No task in DB" not in log + agent_log.read_text()


class GatedAgent(ScriptedAgent):
    """A scripted agent whose ``sha1`` answer waits until ``release()``."""

    def __init__(self, harness: ManagerHarness, info: AgentInfo) -> None:
        super().__init__(harness, info, json_agent())
        self.gate = asyncio.Event()

    async def _handle(self, target: str, payload: str) -> str:
        if '"sha1"' in payload:
            self.received.append((target, payload))
            await self.gate.wait()
            reply = self.script(target, payload)
            assert reply is not None
            return reply
        return await super()._handle(target, payload)

    def release(self) -> None:
        self.loop.call_soon_threadsafe(self.gate.set)


def test_cancel_before_the_installer_means_no_upgrade_command(
    make_harness: Callable[..., ManagerHarness], lab: dict[str, Path]
) -> None:
    """Cancelled while its push waits for ``sha1``: once ``sha1`` is answered, the
    dispatcher does not send ``upgrade`` (``record_phase`` refuses a cancelled task)."""
    node = make_harness(upgrade={"command_timeout": 30})
    info = AgentInfo(5, "web-5", "Wazuh v4.8.0", "ubuntu", "22", "04", "x86_64")
    agent = GatedAgent(node, info)
    agent.start()
    try:
        node.wait_for(lambda: (known := node.store.get_agent(5)) is not None and known.active)
        home = ["--home", str(node.config.home)]
        proc = run("upgrade-custom", "5", "--file", str(lab["wpk"]), *home)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        node.wait_for(lambda: any('"sha1"' in p for _, p in list(agent.received)), 30)
        proc = run("cancel", "5", *home)
        assert proc.returncode == 0 and proc.stdout.strip() == "agent 005: task 1 cancelled"
        agent.release()
        manager = node.manager
        assert manager is not None
        node.wait_for(lambda: not manager.dispatcher.running, 30)
        commands = [json.loads(p)["command"] for t, p in agent.received if t == "upgrade"]
        assert "upgrade" not in commands and commands[-1] == "sha1"
        (item,) = node.result([5])
        assert (item["status"], item["error_msg"]) == ("Cancelled", "Task cancelled by request")
        changes = [c.to_status.value for c in node.store.history(1)]
        assert changes == ["Pending", "In progress", "Cancelled"]
    finally:
        agent.stop()
