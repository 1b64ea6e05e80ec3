"""The installer runner: real scripts in their own session, timeouts, bounded output, and a
background part that outlives the call (as the reference ``upgrade.sh`` does)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from wpk_upgrade.agent.installer import InstallerResult, run_installer
from wpk_upgrade.errors import AgentCode, AgentCommandError


def script(tmp_path: Path, body: str, name: str = "upgrade.sh", mode: int = 0o750) -> Path:
    path = tmp_path / name
    path.write_text(body)
    path.chmod(mode)
    return path


def run(
    path: Path,
    timeout: float = 10,
    env: dict[str, str] | None = None,
    output_limit: int = 65536,
) -> InstallerResult:
    return asyncio.run(
        run_installer(path, cwd=path.parent, timeout=timeout, env=env, output_limit=output_limit)
    )


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_exit_status_output_cwd_and_env(tmp_path: Path) -> None:
    path = script(
        tmp_path,
        '#!/bin/sh\necho "cwd=$PWD"\necho "home=$WPK_AGENT_HOME" >&2\nexit 7\n',
    )
    result = run(path, env={"WPK_AGENT_HOME": "/some/home"})
    assert result.status == 7
    assert result.output == f"cwd={tmp_path}\nhome=/some/home\n"
    assert result.seconds < 5


def test_runs_in_its_own_session(tmp_path: Path) -> None:
    path = script(
        tmp_path,
        f"#!{sys.executable}\nimport os, sys\nsys.exit(0 if os.getsid(0) == os.getpid() else 1)\n",
    )
    assert run(path).status == 0


def test_output_is_bounded(tmp_path: Path) -> None:
    path = script(tmp_path, "#!/bin/sh\nhead -c 300000 /dev/zero | tr '\\0' x\n")
    result = run(path, output_limit=1000)
    assert result.status == 0 and result.output == "x" * 1000


def test_killed_by_signal_reports_128_plus_n(tmp_path: Path) -> None:
    path = script(tmp_path, "#!/bin/sh\nkill -TERM $$\nsleep 5\n")
    assert run(path).status == 128 + signal.SIGTERM


def test_background_part_outlives_the_installer(tmp_path: Path) -> None:
    """Like the reference upgrade.sh: a background subshell that keeps stdout open writes the
    result later. The call returns at once and the subshell is neither waited for nor killed
    (no SIGPIPE: output goes to a file, not a pipe)."""
    result_file = tmp_path / "upgrade_result"
    path = script(
        tmp_path,
        "#!/bin/sh\n(sleep 0.5; echo 'still talking'; printf 0 > upgrade_result) &\n"
        "echo started\nexit 0\n",
    )
    result = run(path)
    assert result.status == 0 and result.output.startswith("started")
    assert result.seconds < 0.5
    assert not result_file.exists()
    assert wait_until(lambda: result_file.exists() and result_file.read_text() == "0")


def test_timeout_kills_the_whole_group(tmp_path: Path) -> None:
    path = script(tmp_path, "#!/bin/sh\nsleep 30 &\necho $! > child.pid\nsleep 30\n")
    started = time.monotonic()
    with pytest.raises(AgentCommandError) as err:
        run(path, timeout=0.5)
    assert err.value.code == AgentCode.EXECUTE
    assert "did not finish within 0.5 s" in err.value.detail
    assert time.monotonic() - started < 5
    child = int((tmp_path / "child.pid").read_text())
    assert wait_until(lambda: not _running(child))


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return not fh.read().split(") ", 1)[1].startswith("Z")
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(
    ("name", "body", "mode"),
    [
        ("missing.sh", None, 0),
        ("not_executable.sh", "#!/bin/sh\nexit 0\n", 0o644),
        ("no_interpreter_line.sh", "exit 0\n", 0o750),
        ("bad_interpreter.sh", "#!/no/such/shell\nexit 0\n", 0o750),
    ],
)
def test_cannot_execute(tmp_path: Path, name: str, body: str | None, mode: int) -> None:
    path = tmp_path / name if body is None else script(tmp_path, body, name, mode)
    with pytest.raises(AgentCommandError) as err:
        run(path)
    assert err.value.code == AgentCode.EXECUTE
    assert err.value.text == "Error executing command"
    assert name in err.value.detail


def test_event_loop_keeps_running(tmp_path: Path) -> None:
    path = script(tmp_path, "#!/bin/sh\nsleep 0.5\n")

    async def main() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        tick = asyncio.create_task(ticker())
        await run_installer(path, cwd=tmp_path, timeout=5)
        tick.cancel()
        return ticks

    assert asyncio.run(main()) >= 5


def test_environment_is_inherited_and_extended(tmp_path: Path) -> None:
    os.environ["WPK_TEST_INHERITED"] = "yes"
    try:
        path = script(tmp_path, '#!/bin/sh\necho "$WPK_TEST_INHERITED $WPK_AGENT_PID"\n')
        assert run(path, env={"WPK_AGENT_PID": "42"}).output == "yes 42\n"
    finally:
        del os.environ["WPK_TEST_INHERITED"]
