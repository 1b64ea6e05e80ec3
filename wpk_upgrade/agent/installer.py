"""Run a WPK's installer: own process group, bounded time, bounded captured output.

The installer runs with ``cwd`` = the upgrade directory and the agent's context in its
environment (``WPK_AGENT_HOME``, ``WPK_AGENT_PID``, ``WPK_AGENT_CONFIG``). It is started in a
new session (``start_new_session=True``) so that a background part it leaves behind (the
reference ``upgrade.sh`` forks a subshell and exits 0 at once; the subshell later installs,
restarts the agent and writes ``upgrade_result``) survives the agent's own restart.

Output goes to an anonymous temporary file, not a pipe: a background child that keeps the
installer's stdout would otherwise hold the pipe open (we would wait for it) or be killed by
SIGPIPE once we stop reading. Only the first ``output_limit`` bytes are read back for the logs
and the legacy reply.

On timeout the whole process group is killed (SIGKILL) and ``AgentCommandError(18)`` raised,
as is any failure to start the program (missing, not executable, bad interpreter).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import AgentCode, AgentCommandError

OUTPUT_LIMIT = 65536


@dataclass(frozen=True)
class InstallerResult:
    """How an installer ended: its exit status (128 + n when killed by signal n) and output."""

    status: int
    output: str
    seconds: float


def _command(path: Path) -> list[str]:
    if sys.platform == "win32":  # pragma: no cover - Windows installers are batch files
        return [os.environ.get("COMSPEC", "cmd.exe"), "/c", str(path)]
    return [str(path)]


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def run_installer(
    path: Path,
    *,
    cwd: Path,
    timeout: float,
    env: Mapping[str, str] | None = None,
    output_limit: int = OUTPUT_LIMIT,
) -> InstallerResult:
    """Run ``path`` and wait at most ``timeout`` seconds for it to exit.

    ``env`` entries are added to the agent's own environment. Raises
    ``AgentCommandError(EXECUTE)`` when the program cannot be started or outlives the timeout.
    """
    full_env = {**os.environ, **(env or {})}
    started = time.monotonic()
    with tempfile.TemporaryFile() as out:
        try:
            proc = await asyncio.create_subprocess_exec(
                *_command(path),
                cwd=str(cwd),
                env=full_env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise AgentCommandError(
                AgentCode.EXECUTE, f"cannot execute {path}: {exc.strerror or exc}"
            ) from exc
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError as exc:
            _kill_group(proc.pid)
            await proc.wait()
            raise AgentCommandError(
                AgentCode.EXECUTE,
                f"installer {path.name} did not finish within {timeout:g} s; process group killed",
            ) from exc
        except asyncio.CancelledError:
            _kill_group(proc.pid)
            raise
        out.seek(0)
        output = out.read(output_limit).decode("utf-8", errors="replace")
    code = proc.returncode if proc.returncode is not None else -1
    status = 128 - code if code < 0 else code
    return InstallerResult(status, output, time.monotonic() - started)
