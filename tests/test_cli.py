"""The ``wpk-upgrade`` command line as a process: errors are one clear line, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from wpk_upgrade.testing.harness import ManagerHarness

CLI = [sys.executable, "-m", "wpk_upgrade.cli"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_bad_manager_config_names_file_and_keys(tmp_path: Path) -> None:
    config = tmp_path / "manager.toml"
    config.write_text(
        f'home = "{tmp_path}"\n[upgrade]\nchunk_size = 10\n[task_manager]\ntask_timeout = "abc"\n'
    )
    proc = run("manager", "--config", str(config))
    assert proc.returncode == 2
    err = proc.stderr
    assert "Traceback" not in err
    assert str(config) in err
    assert "upgrade.chunk_size" in err and "task_manager.task_timeout" in err


def test_missing_and_invalid_toml(tmp_path: Path) -> None:
    proc = run("manager", "--config", str(tmp_path / "absent.toml"))
    assert proc.returncode == 2 and "configuration file not found" in proc.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("home = \n")
    proc = run("manager", "--config", str(bad))
    assert proc.returncode == 2 and "not valid TOML" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_send_to_missing_socket_is_one_line(tmp_path: Path) -> None:
    proc = run("send", str(tmp_path / "nothing"), "{}")
    assert proc.returncode == 3
    assert proc.stderr.strip().count("\n") == 0 and "is the daemon running" in proc.stderr
    proc = run("send", str(tmp_path / "nothing"), "not json")
    assert proc.returncode == 2 and "--raw" in proc.stderr


def test_send_talks_to_a_running_manager(harness: ManagerHarness) -> None:
    msg = {"origin": {"module": "api"}, "command": "upgrade_result", "parameters": {"agents": [5]}}
    proc = run("send", str(harness.config.task_socket), json.dumps(msg))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "error": 0,
        "data": [{"error": 3, "message": "No task in DB", "agent": 5}],
        "message": "Success",
    }
    proc = run("send", "--raw", str(harness.config.upgrade_socket), "unknown")
    assert json.loads(proc.stdout)["message"] == "Could not parse message JSON"


def test_plugins_lists_builtins_with_origin() -> None:
    proc = run("plugins")
    assert proc.returncode == 0
    out = proc.stdout
    for name in (
        "https",
        "file",
        "custom",
        "sqlite",
        "postgresql",
        "mysql",
        "tcp",
        "rules_version",
        "rules_system",
    ):
        assert name in out
    assert "(wpk-upgrade)" in out


# --------------------------------------------------------------------------- usage errors


def usage_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one ``error: `` line of a usage error (status 2), with its ``--help`` hint."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Usage:" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and lines[0].endswith(" --help)"), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["agents", "--nope"], "error: no such option '--nope'"),
        (["--nope"], "error: no such option '--nope'"),
        (["nosuch"], "error: no such command 'nosuch' (see wpk-upgrade --help)"),
        (["history", "abc"], "error: invalid value for 'TASK_ID': 'abc' is not a valid task id"),
        (["result"], "error: missing argument"),
        (["upgrade", "5", "--package-type", "zip"], "error: invalid value for '--package-type'"),
        (["upgrade-custom", "5"], "error: missing option '--file'"),
        (["watch", "5", "--interval", "0"], "error: invalid value for '--interval'"),
        (["tasks", "--limit", "-1"], "error: invalid value for '--limit'"),
        (["wpk", "verify"], "error: missing argument"),
        (["wpk", "pack", "out.wpk"], "error: missing argument"),
        (["ca", "issue-agent"], "error: missing"),
        (["config", "check"], "error: missing argument 'FILE'"),
        (["manager"], "error: missing option '--config'"),
        (["send", "/nowhere"], "error: missing argument 'MESSAGE'"),
        (["demo", "--agents", "x"], "error: invalid value for '--agents'"),
    ],
)
def test_every_usage_error_is_one_error_line_and_status_2(args: list[str], expected: str) -> None:
    line = usage_line(run(*args))
    assert line.startswith(expected), line
    assert "(see wpk-upgrade " in line


def test_usage_errors_name_the_command_for_help() -> None:
    assert usage_line(run("agents", "--nope")).endswith("(see wpk-upgrade agents --help)")
    assert usage_line(run("wpk", "verify")).endswith("(see wpk-upgrade wpk verify --help)")
    assert usage_line(run("--nope")).endswith("(see wpk-upgrade --help)")


def test_help_is_untouched() -> None:
    for args in (
        ["--help"],
        ["agents", "--help"],
        ["wpk", "--help"],
        ["config", "check", "--help"],
    ):
        proc = run(*args)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("Usage: wpk-upgrade") and proc.stderr == ""
    proc = run()  # no command: the group's help, as click prints it
    assert "Usage: wpk-upgrade" in proc.stdout + proc.stderr and "error:" not in proc.stderr
    assert "--home" in run("--help").stdout and "--config" in run("--help").stdout


def test_manager_config_may_come_before_the_command(tmp_path: Path) -> None:
    config = tmp_path / "manager.toml"
    config.write_text('home = "x"\n[upgrade]\nchunk_size = 10\n')
    proc = run("--config", str(config), "manager")
    assert proc.returncode == 2 and "upgrade.chunk_size" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
