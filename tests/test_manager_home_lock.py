"""One manager per home: real ``wpk-upgrade manager --config FILE`` processes.

A second manager on a home whose manager runs refuses to start (one line, exit 1) and leaves
the running one's sockets and pid file alone; a pid file and sockets left by a ``kill -9``
do not prevent the next start; of two managers started at once on one home, exactly one
runs. The lock is ``flock`` on ``var/run/manager.pid`` (``wpk_upgrade.pidlock``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from wpk_upgrade.daemon import Manager
from wpk_upgrade.errors import WpkUpgradeError
from wpk_upgrade.framing import request_unix
from wpk_upgrade.testing.harness import ManagerHarness, manager_config, wait_until

CLI = [sys.executable, "-m", "wpk_upgrade.cli"]
RESULT = {"origin": {"module": "api"}, "command": "upgrade_result", "parameters": {"agents": [5]}}


def write_config(home: Path, name: str) -> Path:
    """A manager configuration on ``home`` with its own ephemeral transport port."""
    path = home.parent / f"{name}.toml"
    path.write_text(
        f'home = "{home}"\n[transport]\nname = "tcp"\noptions = {{ listen = "127.0.0.1:0" }}\n'
    )
    return path


def answers(home: Path) -> bool:
    """True when both manager sockets of ``home`` serve requests."""
    try:
        for socket in ("task", "upgrade"):
            reply = json.loads(request_unix(str(home / "queue" / "tasks" / socket), b"{}"))
            assert isinstance(reply, dict)
        task = json.loads(
            request_unix(str(home / "queue" / "tasks" / "task"), json.dumps(RESULT).encode())
        )
    except OSError:
        return False
    return bool(task["data"][0]["message"] == "No task in DB")


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    wait_until(predicate, what, timeout)


class Proc:
    """A manager process; its stdout and stderr go to ``<name>.log``."""

    def __init__(self, config: Path, name: str) -> None:
        self.log = config.parent / f"{name}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*CLI, "manager", "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def text(self) -> str:
        return self.log.read_text()

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.running():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


@pytest.fixture
def procs() -> Iterator[Callable[[Path, str], Proc]]:
    started: list[Proc] = []

    def start(config: Path, name: str) -> Proc:
        proc = Proc(config, name)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.running():
            proc.proc.kill()
            proc.proc.wait(10)


def run_second(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "manager", "--config", str(config)], capture_output=True, text=True, timeout=60
    )


def test_second_manager_on_the_same_home_refuses_and_leaves_the_first_alone(
    tmp_path: Path, procs: Callable[[Path, str], Proc]
) -> None:
    home = tmp_path / "home"
    first = procs(write_config(home, "first"), "first")
    wait_for(lambda: answers(home), "the first manager serving")
    pid_file = home / "var" / "run" / "manager.pid"
    assert pid_file.read_text() == f"{first.proc.pid}\n"
    sockets = [home / "queue" / "tasks" / name for name in ("upgrade", "task")]
    inodes = [s.stat().st_ino for s in sockets]

    second = run_second(write_config(home, "second"))

    assert second.returncode == 1, second.stderr
    assert "Traceback" not in second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert lines[0].endswith(
        f"cannot start: another manager is already running on {home} (pid {first.proc.pid})"
    )
    # Nothing of the first was touched: same socket files, same pid file, still serving.
    assert [s.stat().st_ino for s in sockets] == inodes
    assert pid_file.read_text() == f"{first.proc.pid}\n"
    assert first.running() and answers(home)
    assert "cannot start" not in first.text

    assert first.stop() == 0
    assert not any(s.exists() for s in sockets) and not pid_file.exists()


def test_stale_pid_file_and_sockets_of_a_killed_manager_do_not_prevent_a_start(
    tmp_path: Path, procs: Callable[[Path, str], Proc]
) -> None:
    home = tmp_path / "home"
    config = write_config(home, "m")
    killed = procs(config, "killed")
    wait_for(lambda: answers(home), "the manager serving")
    os.kill(killed.proc.pid, signal.SIGKILL)
    killed.proc.wait(10)
    pid_file = home / "var" / "run" / "manager.pid"
    assert pid_file.read_text() == f"{killed.proc.pid}\n"  # left behind, as are the sockets
    assert (home / "queue" / "tasks" / "task").is_socket() and not answers(home)

    again = procs(config, "again")
    wait_for(lambda: answers(home), "the new manager serving")
    assert pid_file.read_text() == f"{again.proc.pid}\n"
    assert again.stop() == 0, again.text
    assert not pid_file.exists()


def test_two_managers_started_at_once_leave_exactly_one_running(
    tmp_path: Path, procs: Callable[[Path, str], Proc]
) -> None:
    home = tmp_path / "home"
    both = [procs(write_config(home, name), name) for name in ("a", "b")]
    wait_for(lambda: sum(p.running() for p in both) == 1, "one of the two exiting")
    (refused,) = [p for p in both if not p.running()]
    (winner,) = [p for p in both if p.running()]
    assert refused.proc.returncode == 1
    assert f"another manager is already running on {home} (pid {winner.proc.pid})" in refused.text
    wait_for(lambda: answers(home), "the remaining manager serving")
    assert (home / "var" / "run" / "manager.pid").read_text() == f"{winner.proc.pid}\n"
    assert winner.running()
    assert winner.stop() == 0, winner.text


def test_in_process_manager_refuses_a_held_home_and_its_stop_removes_nothing(
    tmp_path: Path,
) -> None:
    """The library object: ``Manager.start`` raises before opening anything, and the
    refused manager's ``stop`` leaves the running one's sockets and pid file."""
    home = tmp_path / "home"
    with ManagerHarness(manager_config(home)) as running:
        second = ManagerHarness(manager_config(home))
        second._thread.start()

        async def refused() -> str:
            manager = Manager(second.config)
            try:
                await manager.start()
            except WpkUpgradeError as exc:
                await manager.stop()
                return str(exc)
            raise AssertionError("a second manager started on a held home")

        message = second.run(refused())
        second.stop()
        assert message == f"another manager is already running on {home} (pid {os.getpid()})"
        assert running.config.task_socket.is_socket() and running.config.upgrade_socket.is_socket()
        assert running.result([5])[0]["message"] == "No task in DB"
        assert (home / "var" / "run" / "manager.pid").read_text() == f"{os.getpid()}\n"
    assert not (home / "var" / "run" / "manager.pid").exists()
