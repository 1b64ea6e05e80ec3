"""The operator commands (``cli_ops.py``) run as processes against a real manager node.

Every command is run as ``python -m wpk_upgrade.cli ...`` against a ``ManagerHarness`` (SQLite
store, real sockets, tcp transport) with ``ScriptedAgent`` agents on the real transport. The
upgrades use a real signed WPK: in a ``file://`` repository with a ``versions`` file, or as an
``upgrade_custom`` file.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from wpk_upgrade import cli, cli_ca, cli_ops, pki, wpk
from wpk_upgrade.models import AgentInfo
from wpk_upgrade.testing.harness import ManagerHarness, ScriptedAgent, json_agent

CLI = [sys.executable, "-m", "wpk_upgrade.cli"]
WPK_REL = "linux/deb/amd64/wazuh_agent_v4.9.1_linux_amd64.deb.wpk"
DONE = {"error": 0, "message": "Upgrade was successful", "status": "Done"}


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def home_of(h: ManagerHarness) -> list[str]:
    return ["--home", str(h.config.home)]


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def agent(agent_id: int, version: str = "Wazuh v4.8.0") -> AgentInfo:
    return AgentInfo(
        agent_id=agent_id,
        name=f"web-{agent_id}",
        version=version,
        os_platform="ubuntu",
        os_major="22",
        os_minor="04",
        os_arch="x86_64",
    )


def slow(delay: float = 0.03, **kwargs: Any) -> Callable[[str, str], str | None]:
    """A JSON agent that takes ``delay`` seconds per written chunk (so progress shows)."""
    script = json_agent(**kwargs)

    def answer(target: str, payload: str) -> str | None:
        if '"command":"write"' in payload.replace(" ", ""):
            time.sleep(delay)
        return script(target, payload)

    return answer


def got(a: ScriptedAgent, command: str) -> bool:
    return any(f'"{command}"' in payload for _, payload in list(a.received))


def report_when_installed(h: ManagerHarness, a: ScriptedAgent) -> threading.Thread:
    """In the background: once the agent got ``upgrade``, report success as it would."""

    def go() -> None:
        h.wait_for(lambda: got(a, "upgrade"), 30)
        time.sleep(0.3)
        a.report(DONE)

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``file://`` repository in the reference layout holding one real signed WPK (v4.9.1)
    whose payload does not compress (about 64 KiB on the wire)."""
    root = tmp_path_factory.mktemp("repo")
    ca = pki.create_ca(root / "ca")
    signer = pki.issue_certificate(ca.cert, ca.key, root / "signer", "wpk signer", "code")
    src = root / "src"
    src.mkdir()
    (src / "upgrade.sh").write_text("#!/bin/sh\nexit 0\n")
    (src / "package.bin").write_bytes(os.urandom(64 * 1024))
    out = root / "repo" / WPK_REL
    out.parent.mkdir(parents=True)
    packed = wpk.pack(out, signer.cert, signer.key, [src / "upgrade.sh", src / "package.bin"])
    (out.parent / "versions").write_text(f"v4.9.1 {packed.sha1}\nv4.8.2 {'0' * 40}\n")
    return root / "repo"


@pytest.fixture
def node(make_harness: Callable[..., ManagerHarness]) -> ManagerHarness:
    """A manager pushing 1 KiB chunks (so a transfer takes a while with ``slow`` agents)."""
    return make_harness(upgrade={"chunk_size": 1024, "command_timeout": 5})


@pytest.fixture
def agents(node: ManagerHarness) -> Iterator[Callable[..., ScriptedAgent]]:
    started: list[ScriptedAgent] = []

    def start(info: AgentInfo, script: Callable[[str, str], str | None]) -> ScriptedAgent:
        a = ScriptedAgent(node, info, script)
        a.start()
        started.append(a)
        return a

    yield start
    for a in started:
        a.stop()


# --------------------------------------------------------------------------- generic


def test_exit_statuses_are_the_main_cli_ones() -> None:
    assert (cli_ops.EXIT_FAILED, cli_ops.EXIT_USAGE, cli_ops.EXIT_UNREACHABLE) == (
        cli.EXIT_FAILED,
        cli.EXIT_USAGE,
        cli.EXIT_UNREACHABLE,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["agents"],
        ["list-outdated"],
        ["tasks"],
        ["history", "1"],
        ["result", "5"],
        ["watch", "5"],
        ["cancel", "5"],
        ["upgrade", "5", "--version", "v4.9.1"],
        ["upgrade-custom", "5", "--file", "/tmp/x.wpk"],
    ],
)
def test_a_manager_that_is_down_is_one_line_and_status_3(tmp_path: Path, args: list[str]) -> None:
    proc = run(*args, "--home", str(tmp_path))
    assert proc.returncode == 3
    line = one_line_error(proc)
    assert line.startswith("error: ") and "is the manager running" in line


def test_home_from_config_env_and_default(node: ManagerHarness, tmp_path: Path) -> None:
    config = tmp_path / "manager.toml"
    config.write_text(f'home = "{node.config.home}"\n')
    assert run("agents", "--config", str(config)).returncode == 0
    env = {cli_ops.HOME_ENV: str(node.config.home)}
    assert run("agents", env=env).returncode == 0
    # Without any of them: the default home, where no manager runs here.
    proc = run("agents", env={cli_ops.HOME_ENV: ""})
    assert proc.returncode == 3 and cli_ops.DEFAULT_HOME in proc.stderr
    proc = run("agents", "--config", str(config), "--home", str(tmp_path))
    assert proc.returncode == 2 and "not both" in proc.stderr
    # The same options before the command (on the main group); the command's own win.
    assert run("--home", str(node.config.home), "agents").returncode == 0
    assert run("--config", str(config), "agents", env={cli_ops.HOME_ENV: ""}).returncode == 0
    proc = run("--home", str(tmp_path), "agents", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    proc = run("--home", str(tmp_path), "--config", str(config), "agents")
    assert proc.returncode == 2 and "not both" in one_line_error(proc)
    proc = run("--home", str(tmp_path), "tasks")
    assert proc.returncode == 3 and str(tmp_path) in one_line_error(proc)
    bad = tmp_path / "bad.toml"
    bad.write_text('home = "x"\n[upgrade]\nchunk_size = 1\n')
    proc = run("agents", "--config", str(bad))
    assert proc.returncode == 2 and "upgrade.chunk_size" in one_line_error(proc)


def test_agent_ids_accept_padding_lists_and_refuse_junk(node: ManagerHarness) -> None:
    proc = run("result", "5", "005,6", "0005", "999999", "--json", *home_of(node))
    assert proc.returncode == 1  # no task for any agent
    assert [i["agent"] for i in json.loads(proc.stdout)] == [5, 6, 999999]
    proc = run("result", "five", *home_of(node))
    assert proc.returncode == 2 and "'five' is not an agent id" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("upgrade", "5", "--version", "latest", *home_of(node))
    assert proc.returncode == 2 and "is not a version" in proc.stderr


AGENT_ID_COMMANDS = [
    ["result"],
    ["watch"],
    ["agents"],
    ["cancel"],
    ["upgrade", "--version", "v4.9.1"],
    ["upgrade-custom", "--file", "/tmp/x.wpk"],
    ["tasks", "--agent"],
]


def with_ids(command: list[str], ids: str) -> list[str]:
    """``command`` with the agent ids: after ``tasks --agent``, else after the command name."""
    return [*command, ids] if command[0] == "tasks" else [command[0], ids, *command[1:]]


@pytest.mark.parametrize("command", AGENT_ID_COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize("bad", ["1000000", "0001000000", "5,1000000", "99999999999999999999"])
def test_an_agent_id_out_of_range_is_one_usage_line(
    tmp_path: Path, command: list[str], bad: str
) -> None:
    """Ids go from 1 to 999999 (an agent's ``agent.id``); checked before the manager is asked
    (no manager runs at this home)."""
    proc = run(*with_ids(command, bad), "--home", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    number = bad.split(",")[-1]
    assert one_line_error(proc) == (
        f"error: agent {number} is out of range; agent ids are 1 to 999999 "
        f"(see wpk-upgrade {command[0]} --help)"
    )


@pytest.mark.parametrize(
    "command", [c for c in AGENT_ID_COMMANDS if "upgrade" not in c[0]], ids=lambda c: c[0]
)
def test_the_manager_id_is_refused_by_the_reading_commands(
    tmp_path: Path, command: list[str]
) -> None:
    for zero in ("0", "000"):
        proc = run(*with_ids(command, zero), "--home", str(tmp_path))
        assert proc.returncode == 2
        assert one_line_error(proc).startswith(
            f"error: {zero} is the manager, not an agent; agent ids are 1 to 999999"
        )


def test_the_manager_id_on_upgrade_is_the_managers_answer(node: ManagerHarness) -> None:
    """The upgrade commands send 000 as asked; the manager answers its own error 7."""
    for args in (["upgrade", "000", "--version", "v4.9.1"], ["upgrade-custom", "0", "-f", "/x"]):
        proc = run(*args, *home_of(node))
        assert proc.returncode == 1 and proc.stderr == ""
        assert proc.stdout == (
            "agent 000: not upgraded: error 7 Action not available for Manager (agent 000)\n"
        )


# --------------------------------------------------------------------------- upgrade


def test_upgrade_from_a_repository_then_wait(
    node: ManagerHarness, agents: Callable[..., ScriptedAgent], repo: Path
) -> None:
    a5 = agents(agent(5), slow(0.0))
    a6 = agents(agent(6), slow(0.01))
    url = repo.as_uri()
    proc = run("upgrade", "5", "7", "--repo", url, *home_of(node))
    assert proc.returncode == 1, proc.stderr  # agent 7 is unknown
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("agent 005: task ") and lines[0].endswith(" created")
    assert lines[1] == ("agent 007: not upgraded: error 6 Agent information not found in database")
    node.wait_for(lambda: got(a5, "upgrade"))
    proc = run("upgrade", "005", "--repo", url, *home_of(node))
    assert proc.returncode == 1
    assert proc.stdout.strip() == (
        "agent 005: not upgraded: error 10 Upgrade procedure could not start. "
        "Agent already upgrading"
    )
    # --wait follows the upgrade to its end; the default target is the newest version (D1).
    report_when_installed(node, a6)
    proc = run(
        "upgrade", "6", "--repo", url, "--wait", "--plain", "--interval", "0.2", *home_of(node)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "agent 006: task" in proc.stdout
    assert "Updating" in proc.stdout and "Updated" in proc.stdout.splitlines()[-1]
    assert "1 agent(s): 1 succeeded, 0 failed" in proc.stderr
    params = json.loads(next(p for _, p in a6.received if '"upgrade"' in p))["parameters"]
    assert params == {"file": Path(WPK_REL).name, "installer": "upgrade.sh"}


def test_upgrade_json_and_version_options(
    node: ManagerHarness, agents: Callable[..., ScriptedAgent], repo: Path
) -> None:
    agents(agent(8), slow(0.0))
    proc = run(
        "upgrade", "8", "--repo", repo.as_uri(), "-v", "4.9.1", "--package-type", "deb",
        "--force", "--json", *home_of(node),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (item,) = json.loads(proc.stdout)
    assert item["agent"] == 8 and item["error"] == 0 and item["task_id"] >= 1
    node.wait_for(lambda: node.result([8])[0]["status"] in ("Updating", "Updated"))


def test_upgrade_custom_and_watch_plain(
    node: ManagerHarness, agents: Callable[..., ScriptedAgent], repo: Path
) -> None:
    """``watch`` without a terminal: one plain line per change, progress in bytes, exit 0."""
    a = agents(agent(5), slow(0.03))
    wpk_file = repo / WPK_REL
    proc = run("upgrade-custom", "5", "--file", str(wpk_file), *home_of(node))
    assert proc.returncode == 0 and "agent 005: task" in proc.stdout, proc.stderr
    watcher = subprocess.Popen(
        [*CLI, "watch", "5", "--interval", "0.2", *home_of(node)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    report_when_installed(node, a)
    out, err = watcher.communicate(timeout=60)
    assert watcher.returncode == 0, out + err
    lines = out.splitlines()
    assert all(line.startswith("agent 005  ") for line in lines)
    statuses = [line.split()[2] for line in lines]
    assert statuses[-1] == "Updated" and "Updating" in statuses
    size = wpk_file.stat().st_size
    partial = [ln for ln in lines if "Updating" in ln and "%)" in ln and "(100%)" not in ln]
    assert partial, out  # the transfer was seen half-way
    assert f"({100}%)" in lines[-1] and f"{size / 1024:.1f} KiB" in lines[-1]
    assert "1 agent(s): 1 succeeded, 0 failed" in err


def test_watch_live_table_and_failure_exit(
    node: ManagerHarness, agents: Callable[..., ScriptedAgent], repo: Path
) -> None:
    """``--live``: the rich table (forced as on a terminal); an Error ends with status 1."""
    agents(agent(5), slow(0.01, fail_at="sha1"))
    proc = run(
        "upgrade-custom", "5", "--file", str(repo / WPK_REL), "--wait", "--live",
        "--interval", "0.2", *home_of(node), env={"COLUMNS": "200"},
    )  # fmt: skip
    assert proc.returncode == 1
    out = proc.stdout
    assert "Agent" in out and "Progress" in out and "━" in out  # the table and its bars
    assert "Error" in out and "Send verify sha1 error" in out
    assert "1 agent(s): 0 succeeded, 1 failed" in proc.stderr


def test_watch_live_table_at_80_columns(
    node: ManagerHarness, agents: Callable[..., ScriptedAgent], repo: Path
) -> None:
    """At 80 columns the progress bar gives way; Agent, Status, Elapsed and the error stay
    whole (the error wraps when it is long)."""
    agents(agent(5), slow(0.01, fail_at="sha1"))
    proc = run(
        "upgrade-custom", "5", "--file", str(repo / WPK_REL), "--wait", "--live",
        "--interval", "0.2", *home_of(node), env={"COLUMNS": "80"},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", proc.stdout)  # the terminal's styles
    assert "…" not in out
    for text in ("Agent", "Status", "Elapsed", "Error", "005", "Send verify sha1 error"):
        assert text in out, out
    table_lines = [ln for ln in out.splitlines() if ln.strip().startswith(("┃", "│", "┏"))]
    assert table_lines and all(len(ln.strip()) <= 80 for ln in table_lines)


LONG_ERROR = (
    "Send verify sha1 error: the agent computed a SHA1 that differs from the manager's "
    "for the WPK file it was sent"
)


def rendered(width: int, items: list[dict[str, Any]]) -> str:
    from rich.console import Console

    console = Console(width=width, record=True, file=io.StringIO())
    console.print(cli_ops._render(items, "wpk-upgrade: 2 agent(s)", width))
    return console.export_text()


@pytest.mark.parametrize("width", [80, 100, 200])
def test_watch_table_keeps_agent_status_elapsed_and_error_whole(width: int) -> None:
    items = [
        {
            "agent": 5,
            "status": "Updating",
            "create_time": "2025/01/31 10:00:00",
            "progress": {"sent": 12 * 1024, "total": 66150},
        },
        {
            "agent": 123456,
            "status": "Error",
            "create_time": "2025/01/31 10:00:00",
            "update_time": "2025/01/31 10:02:13",
            "error_msg": LONG_ERROR,
            "progress": {"sent": 66150, "total": 66150},
        },
    ]
    text = rendered(width, items)
    lines = text.splitlines()
    assert all(len(line.rstrip()) <= width for line in lines)
    assert "…" not in text
    header = next(line for line in lines if "Agent" in line)
    for name in ("Agent", "Status", "Elapsed", "Error"):
        assert f" {name} " in header
    assert "123456" in text and "Updating" in text and "0:02:13" in text
    # The error is all there, wrapped into its column when it does not fit.
    error_cells = [line.split("│")[-2].strip() for line in lines if line.startswith("│")]
    assert " ".join(c for c in error_cells if c) == LONG_ERROR
    if width == 80:
        assert "Progress" not in header  # the bar gave way first
        assert "18%" in text and "100%" in text
    if width == 200:
        assert "Progress" in header and "━" in text and "12.0 KiB/64.6 KiB (18%)" in text


def test_table_layout_gives_way_bar_then_bytes() -> None:
    wide = cli_ops.plan_layout(200, 25, 24, 5, 22)
    assert wide == cli_ops.Layout(bar=24, full_bytes=True, error=22)
    # Narrower: the bar shrinks, then goes; the bytes become a percentage, then go.
    widths = [cli_ops.plan_layout(w, 25, 24, 5, 22) for w in (100, 90, 80, 70, 60)]
    assert [lay.bar for lay in widths] == [10, None, None, None, None]
    assert [lay.full_bytes for lay in widths] == [True, True, False, False, None]
    assert all(lay.error == 22 for lay in widths)  # the error column is kept to the end
    assert cli_ops.plan_layout(40, 25, 24, 5, 22).error == 5


def test_watch_json_timeout_and_unknown_agent(
    node: ManagerHarness, agents: Callable[..., ScriptedAgent], repo: Path
) -> None:
    agents(agent(5), slow(0.0))
    run("upgrade-custom", "5", "--file", str(repo / WPK_REL), *home_of(node))
    proc = run("watch", "5", "--wait-timeout", "1", "--interval", "0.2", *home_of(node))
    assert proc.returncode == 1
    assert one_line_error(proc) == (
        "error: timed out after 1 s; not final yet: 005 (their upgrades go on: wpk-upgrade watch 5)"
    )
    proc = run("watch", "9", "--json", *home_of(node))  # no task: final at once, a failure
    assert proc.returncode == 1
    assert json.loads(proc.stdout) == [{"error": 3, "message": "No task in DB", "agent": 9}]


def test_wait_gives_up_after_a_default_timeout(
    node: ManagerHarness, agents: Callable[..., ScriptedAgent], repo: Path
) -> None:
    """``--wait`` (and ``watch``) stop after 30 minutes unless told otherwise (0: never);
    the agents still running are named and the exit status is 1."""
    for command in (cli_ops.upgrade_cmd, cli_ops.upgrade_custom_cmd, cli_ops.watch_cmd):
        (param,) = (p for p in command.params if p.name == "wait_timeout")
        assert param.default == cli_ops.DEFAULT_WAIT_TIMEOUT == 1800
    assert "[default: 1800, 30 minutes; 0: never]" in run("upgrade", "--help").stdout
    cli_ops._deadline_passed(time.monotonic() - 10**6, 0, [{"agent": 5, "status": "Updating"}])
    agents(agent(5), json_agent(stall_at="sha1"))
    agents(agent(6), json_agent(stall_at="sha1"))
    proc = run(
        "upgrade-custom", "5", "6", "--file", str(repo / WPK_REL), "--wait", "--plain",
        "--wait-timeout", "1", "--interval", "0.2", *home_of(node),
    )  # fmt: skip
    assert proc.returncode == 1
    assert one_line_error(proc) == (
        "error: timed out after 1 s; not final yet: 005, 006 "
        "(their upgrades go on: wpk-upgrade watch 5,6)"
    )


# --------------------------------------------------------------------------- result, cancel


def test_result_and_cancel(
    node: ManagerHarness, agents: Callable[..., ScriptedAgent], repo: Path
) -> None:
    agents(agent(5), json_agent(stall_at="sha1"))
    run("upgrade-custom", "5", "--file", str(repo / WPK_REL), *home_of(node))
    node.wait_for(lambda: node.result([5])[0]["status"] == "Updating")
    proc = run("result", "5", *home_of(node))
    assert proc.returncode == 0
    header, row = proc.stdout.splitlines()
    assert header.split()[:4] == ["AGENT", "STATUS", "TASK", "COMMAND"]
    assert row.split()[:2] == ["005", "Updating"] and "upgrade_custom" in row
    proc = run("cancel", "5", *home_of(node))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("cancelled")
    proc = run("cancel", "5", "--json", *home_of(node))
    assert proc.returncode == 1
    assert json.loads(proc.stdout) == [{"error": 3, "message": "No task in DB", "agent": 5}]
    (item,) = json.loads(run("result", "5", "--json", *home_of(node)).stdout)
    assert item["status"] == "Cancelled" and item["error_msg"] == "Task cancelled by request"


# --------------------------------------------------------------------------- listings


def test_agents_and_list_outdated(
    node: ManagerHarness, agents: Callable[..., ScriptedAgent], repo: Path
) -> None:
    agents(agent(5), json_agent())
    agents(agent(6, "Wazuh v4.9.1"), json_agent())
    node.seed_agent(AgentInfo(agent_id=7, name="gone", version=None))
    proc = run("agents", *home_of(node))
    assert proc.returncode == 0
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert rows[0][:4] == ["AGENT", "NAME", "VERSION", "PLATFORM"]
    assert [r[0] for r in rows[1:]] == ["005", "006", "007"]
    assert "ubuntu 22.04 x86_64" in proc.stdout and "active" in proc.stdout
    items = json.loads(run("agents", "6", "--json", *home_of(node)).stdout)
    assert [(i["agent"], i["version"], i["connection_status"]) for i in items] == [
        (6, "Wazuh v4.9.1", "active")
    ]
    # Newest version from the repository's versions file for the agents' platform.
    proc = run("list-outdated", "--repo", repo.as_uri(), *home_of(node))
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:4] == ["AGENT", "NAME", "VERSION", "NEWEST"]
    assert [ln.split()[0] for ln in lines[1:]] == ["005"]
    assert "v4.9.1" in lines[1]
    assert "agent(s) 007" in proc.stderr  # no version known: cannot tell
    proc = run("list-outdated", "--version", "v4.10.0", "--json", *home_of(node))
    assert [(i["agent"], i["target"]) for i in json.loads(proc.stdout)] == [
        (5, "v4.10.0"),
        (6, "v4.10.0"),
    ]


def test_unknown_agents_are_named_and_fail(
    node: ManagerHarness, agents: Callable[..., ScriptedAgent]
) -> None:
    agents(agent(5), json_agent())
    proc = run("agents", "7", *home_of(node))
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", "agent 007: unknown agent\n")
    proc = run("agents", "005", "7,8", *home_of(node))
    assert proc.returncode == 1
    assert [ln.split()[0] for ln in proc.stdout.splitlines()] == ["AGENT", "005"]
    assert proc.stderr.splitlines() == ["agent 007: unknown agent", "agent 008: unknown agent"]
    proc = run("agents", "7", "--json", *home_of(node))
    assert proc.returncode == 1 and json.loads(proc.stdout) == []
    assert proc.stderr == "agent 007: unknown agent\n"
    # result keeps the reference's "No task in DB" for an agent without a task.
    proc = run("result", "7", *home_of(node))
    assert proc.returncode == 1 and "No task in DB" in proc.stdout


def test_empty_listings_say_so(
    make_harness: Callable[..., ManagerHarness], agents: Callable[..., ScriptedAgent]
) -> None:
    empty = home_of(make_harness())
    for args, line in [
        (["agents"], "no agents: the manager knows none yet"),
        (["list-outdated"], "no outdated agents (the manager knows no agents)"),
        (["tasks"], "no tasks in the store"),
        (["tasks", "--status", "error", "--agent", "5"], "no tasks match these filters"),
    ]:
        proc = run(*args, *empty)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, line + "\n", ""), args
        proc = run(*args, "--json", *empty)
        assert (proc.returncode, json.loads(proc.stdout)) == (0, []), args


def test_list_outdated_with_everyone_current(
    node: ManagerHarness, agents: Callable[..., ScriptedAgent]
) -> None:
    agents(agent(5, "Wazuh v4.9.1"), json_agent())
    agents(agent(6, "Wazuh v4.10.0"), json_agent())
    proc = run("list-outdated", "--version", "v4.9.1", *home_of(node))
    assert proc.returncode == 0
    assert proc.stdout == "no outdated agents (2 agent(s) at or above the target version)\n"
    node.seed_agent(AgentInfo(agent_id=7, name="gone", version=None))
    proc = run("list-outdated", "--version", "v4.9.1", *home_of(node))
    assert proc.returncode == 0
    assert proc.stdout == (
        "no outdated agents (2 agent(s) at or above the target version, 1 that cannot be told)\n"
    )
    assert "agent(s) 007" in proc.stderr
    assert json.loads(run("list-outdated", "-v", "v4.9.1", "--json", *home_of(node)).stdout) == []


def test_tasks_filters_and_history(
    node: ManagerHarness, agents: Callable[..., ScriptedAgent], repo: Path
) -> None:
    a5 = agents(agent(5), json_agent())
    agents(agent(6), json_agent(fail_at="close"))
    run("upgrade-custom", "5", "6", "--file", str(repo / WPK_REL), *home_of(node))
    node.wait_for(lambda: got(a5, "upgrade"))
    a5.report(DONE)
    node.wait_final([5, 6])
    home = home_of(node)
    everything = json.loads(run("tasks", "--json", *home).stdout)
    assert sorted((t["agent"], t["status"]) for t in everything) == [(5, "Updated"), (6, "Error")]
    proc = run("tasks", "--status", "updated", *home)
    assert proc.returncode == 0
    header, *rows = proc.stdout.splitlines()
    assert header.split() == [
        "TASK", "AGENT", "NODE", "COMMAND", "STATUS", "CREATED", "UPDATED", "ERROR"
    ]  # fmt: skip
    assert [r.split()[1] for r in rows] == ["005"]
    errors = json.loads(run("tasks", "-s", "Failed", "--agent", "6", "--json", *home).stdout)
    assert [t["error_msg"] for t in errors] == ["Send close file error"]
    assert json.loads(run("tasks", "--node", "other", "--json", *home).stdout) == []
    assert json.loads(run("tasks", "--since", "2099-01-01", "--json", *home).stdout) == []
    assert (
        len(json.loads(run("tasks", "--until", "0d", "--limit", "1", "--json", *home).stdout)) == 1
    )
    proc = run("tasks", "--status", "sleeping", *home)
    assert proc.returncode == 2 and "unknown status 'sleeping'" in proc.stderr
    proc = run("tasks", "--since", "yesterday", *home)
    assert proc.returncode == 2 and "duration ago" in proc.stderr
    # The history of agent 5's task, oldest first.
    task_id = next(t["task_id"] for t in everything if t["agent"] == 5)
    proc = run("history", str(task_id), *home)
    assert proc.returncode == 0
    moves = [line.split()[2:4] for line in proc.stdout.splitlines()[1:]]
    assert moves == [["-", "In"], ["In", "queue"], ["Updating", "Updated"]]
    changes = json.loads(run("history", str(task_id), "--json", *home).stdout)
    assert [(c["from"], c["to"]) for c in changes] == [
        (None, "In queue"),
        ("In queue", "Updating"),
        ("Updating", "Updated"),
    ]
    proc = run("history", "999", *home)
    assert proc.returncode == 1 and "No task in DB" in one_line_error(proc)


# --------------------------------------------------------------------------- config check


def test_config_check(tmp_path: Path) -> None:
    manager = tmp_path / "manager.toml"
    manager.write_text(
        f'home = "{tmp_path}"\n[api]\nenabled = true\ntokens = ["{"s" * 32}"]\n'
        "[store.options]\nmax_connections = 4\n[sources.https]\ntimeout = 5\n"
    )
    proc = run("config", "check", str(manager))
    assert proc.returncode == 0 and "valid manager configuration" in proc.stdout
    effective = json.loads(run("config", "check", str(manager), "--json").stdout)
    assert effective["api"]["tokens"] == ["***"] and "s" * 32 not in json.dumps(effective)
    assert effective["upgrade"]["chunk_size"] == 32768 and effective["home"] == str(tmp_path)
    manager.write_text(f'home = "{tmp_path}"\n[store.options]\nmax_connections = 0\n')
    proc = run("config", "check", str(manager))
    assert proc.returncode == 2 and "store.options" in one_line_error(proc)
    manager.write_text(f'home = "{tmp_path}"\n[api]\nenabled = true\n')
    proc = run("config", "check", str(manager))
    assert proc.returncode == 2 and "api.tokens" in one_line_error(proc)
    agent_toml = tmp_path / "agent.toml"
    agent_toml.write_text(f'home = "{tmp_path}"\n[agent]\nid = 5\n')
    proc = run("config", "check", "--agent", str(agent_toml))
    assert proc.returncode == 0 and "valid agent configuration" in proc.stdout
    proc = run("config", "check", str(agent_toml))  # an agent file is not a manager file
    assert proc.returncode == 2 and "agent" in one_line_error(proc)
    assert "check an agent configuration with --agent" in one_line_error(proc)
    agent_toml.write_text(
        f'home = "{tmp_path}"\n[agent]\nid = 5\n[manager.options]\nheartbeat = 0\n'
    )
    proc = run("config", "check", "--agent", str(agent_toml))
    assert proc.returncode == 2 and "manager.options" in one_line_error(proc)
    proc = run("config", "check", str(tmp_path / "missing.toml"))
    assert proc.returncode == 2 and "not found" in one_line_error(proc)


def test_config_check_loads_the_certificates_the_transport_names(tmp_path: Path) -> None:
    """A certificate, key or CA that is missing or is no certificate fails the check (as it
    would fail the daemon's start), naming the file; an agent process does not start."""
    ca_dir = tmp_path / "tls"
    cli_ca.init_ca(ca_dir)
    cli_ca.issue_manager(ca_dir, tmp_path / "mgr", ["127.0.0.1"])
    cli_ca.issue_agent(ca_dir, 5, tmp_path / "agent5")
    ca = ca_dir / "ca.pem"
    manager = tmp_path / "manager.toml"

    def manager_with(**opts: str) -> subprocess.CompletedProcess[str]:
        table = ", ".join(f'{k} = "{v}"' for k, v in opts.items())
        manager.write_text(f'home = "{tmp_path}"\n[transport]\noptions = {{ {table} }}\n')
        return run("config", "check", str(manager))

    mgr = tmp_path / "mgr"
    good = {"ca": str(ca), "cert": str(mgr / "manager.pem"), "key": str(mgr / "manager.key")}
    assert manager_with(**good).returncode == 0
    proc = manager_with(**{**good, "ca": str(tmp_path / "nope" / "ca.pem")})
    assert proc.returncode == 2 and "nope/ca.pem" in one_line_error(proc)
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    proc = manager_with(**{**good, "cert": str(tmp_path / "junk.pem")})
    assert proc.returncode == 2 and "cannot load cert" in one_line_error(proc)
    proc = manager_with(**{**good, "crl": str(tmp_path / "junk.pem")})
    assert proc.returncode == 2 and "is not a CRL" in one_line_error(proc)

    manager.write_text(f'home = "{tmp_path}"\n[transport.options]\nlisen = "x"\n')
    proc = run("config", "check", str(manager))
    assert one_line_error(proc) == f"error: {manager}: transport.options: lisen: Unknown field."
    manager.write_text(
        f'home = "{tmp_path}"\n[api]\nenabled = true\ntokens = ["{"t" * 20}"]\n'
        f'cert = "{tmp_path / "api-none.pem"}"\nkey = "{mgr / "manager.key"}"\n'
    )
    proc = run("config", "check", str(manager))
    assert proc.returncode == 2 and "api: cannot load cert" in one_line_error(proc)
    assert "api-none.pem" in one_line_error(proc)

    agent = tmp_path / "agent.toml"
    missing_cert = tmp_path / "gone.pem"
    agent.write_text(
        f'home = "{tmp_path / "agent-home"}"\n[agent]\nid = 5\n[manager]\n'
        f'options = {{ ca = "{ca}", cert = "{missing_cert}", '
        f'key = "{tmp_path / "agent5" / "agent.key"}" }}\n'
    )
    proc = run("config", "check", "--agent", str(agent))
    assert proc.returncode == 2 and "gone.pem" in one_line_error(proc)
    daemon = subprocess.run(
        [sys.executable, "-m", "wpk_upgrade.agent", "--config", str(agent)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert daemon.returncode == 2, daemon.stderr
    assert daemon.stderr.count("\n") == 1 and "gone.pem" in daemon.stderr
    assert "Traceback" not in daemon.stderr


# --------------------------------------------------------------------------- admin socket


def test_admin_commands_are_checked_and_do_not_shadow_the_reference(
    node: ManagerHarness,
) -> None:
    def admin(command: str, parameters: Any) -> dict[str, Any]:
        return node.task({"command": command, "parameters": parameters})

    assert admin("tasks_list", {}) == {"error": 0, "data": [], "message": "Success"}
    for params, detail in [
        ({"statuses": ["Later"]}, "unknown status 'Later'"),
        ({"agents": ["5"]}, '"agents" must be a list of agent ids'),
        ({"limit": -1}, '"limit" must be an integer >= 0'),
    ]:
        reply = admin("tasks_list", params)
        assert reply["error"] == 1 and reply["message"] == "Invalid message"
        assert reply["detail"].startswith(detail)
    assert admin("task_history", {})["detail"] == '"task_id" is required'
    assert admin("agents_list", {"target": {"version": "x"}})["error"] == 1
    assert admin("agents_list", []) ["detail"] == "'parameters' must be an object"  # fmt: skip
    # A reference message that merely mentions an admin command name is the reference's.
    reply = node.task(
        {"origin": {"module": "api"}, "command": "tasks_list_x", "parameters": {"agents": [1]}}
    )
    assert reply["message"] == "Invalid command"
    assert node.result([1]) == [{"error": 3, "message": "No task in DB", "agent": 1}]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["agents", "1", "--timeout", "1e400"], "--timeout"),
        (["result", "1", "--timeout", "nan"], "not a finite number"),
        (["watch", "5", "--interval", "inf"], "--interval"),
        (["upgrade", "5", "--wait", "--wait-timeout", "-inf"], "--wait-timeout"),
        (["history", "99999999999999999999999"], "TASK_ID"),
        (["tasks", "--limit", "99999999999999999999999"], "--limit"),
        (["tasks", "--since", "99999999999999999999d"], "before 1970"),
        (["tasks", "--until", "999999999999999999999999"], "epoch seconds beyond"),
    ],
)
def test_absurd_numbers_are_usage_errors(tmp_path: Path, args: list[str], says: str) -> None:
    """Infinite, NaN and beyond-64-bit numbers are refused before the manager is asked (they
    were tracebacks, or the manager's 'Invalid message' with exit 1)."""
    proc = run(*args, "--home", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    line = one_line_error(proc)
    assert line.startswith("error: ") and says in line, line
