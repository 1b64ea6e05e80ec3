"""The ``wpk-upgrade`` command line as a process: errors are one clear line, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
