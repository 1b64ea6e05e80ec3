"""R3: a real agent process killed (SIGKILL) at each step of an upgrade, then started again.

A frame-aware TCP proxy sits between the agent and a real manager; it forwards everything and,
when the manager's command of the chosen step passes (``open``, the third ``write``, ``close``,
``sha1``, ``upgrade`` at several delays into verification and unpacking), kills the agent. The
last step kills it after its installer wrote ``var/upgrade/upgrade_result`` but before the
restarted agent reported. The agent is started again at once (as its service manager would).

Each task must end Updated (directly or after a resumed transfer) or Error with a reason
(never stuck), and the agent's ``var/upgrade`` must always hold either what it held before or
the whole new package: the two packages used in turn have disjoint member sets, so a partial
install shows as a mix or a subset.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hardlib import AgentProc, Figure, Lab, Size, scratch, tree_snapshot, wait_until

from wpk_upgrade import wpk
from wpk_upgrade.demo import INSTALLER
from wpk_upgrade.testing.harness import ManagerHarness, manager_config

HEADER = struct.Struct("<I")
FINAL = {"Updated", "Error", "Cancelled", "Timeout", "Legacy"}


class KillProxy:
    """agent <-> proxy <-> manager; ``arm(rule)`` kills the agent when ``rule(command)`` says so
    for a command going to the agent (after forwarding it)."""

    def __init__(self, manager: tuple[str, int]) -> None:
        self.manager = manager
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.rule: Callable[[str], float | None] | None = None
        self.victim: AgentProc | None = None
        self.killed = threading.Event()
        self.commands: list[str] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, victim: AgentProc, rule: Callable[[str], float | None]) -> None:
        with self._lock:
            self.victim, self.rule = victim, rule
            self.killed.clear()
            self.commands.clear()

    def _accept(self) -> None:
        while True:
            try:
                agent_side, _ = self.server.accept()
            except OSError:
                return
            try:
                manager_side = socket.create_connection(self.manager, 10)
            except OSError:
                agent_side.close()
                continue
            threading.Thread(
                target=self._pipe, args=(agent_side, manager_side), daemon=True
            ).start()
            threading.Thread(
                target=self._frames, args=(manager_side, agent_side), daemon=True
            ).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(1 << 16):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _frames(self, src: socket.socket, dst: socket.socket) -> None:
        """manager -> agent, frame by frame, looking at the commands."""
        buf = b""
        attachment_next = False
        try:
            while True:
                while len(buf) >= 4:
                    (size,) = HEADER.unpack(buf[:4])
                    if len(buf) < 4 + size:
                        break
                    body, buf = buf[4 : 4 + size], buf[4 + size :]
                    dst.sendall(HEADER.pack(size) + body)
                    if attachment_next:
                        attachment_next = False
                        continue
                    try:
                        msg = json.loads(body)
                    except ValueError:
                        continue
                    if not isinstance(msg, dict):
                        continue
                    attachment_next = "bin" in msg
                    if msg.get("type") == "request":
                        self._seen(msg)
                chunk = src.recv(1 << 16)
                if not chunk:
                    return
                buf += chunk
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _seen(self, msg: dict[str, Any]) -> None:
        payload = msg.get("payload")
        command = ""
        if msg.get("target") == "com" and isinstance(payload, str):
            command = payload.split(" ", 1)[0]
        elif isinstance(payload, str):
            with contextlib.suppress(ValueError):
                command = str(json.loads(payload).get("command"))
        with self._lock:
            self.commands.append(command)
            rule, victim = self.rule, self.victim
            delay = rule(command) if rule is not None and not self.killed.is_set() else None
            if delay is None:
                return
            self.killed.set()
        threading.Thread(target=self._kill, args=(victim, delay), daemon=True).start()

    @staticmethod
    def _kill(victim: AgentProc | None, delay: float) -> None:
        if delay == SWITCH and victim is not None:
            # kill at the first change of var/upgrade: inside the install switch
            upgrade_dir = victim.home / "var" / "upgrade"
            first = _listing(upgrade_dir)
            deadline = time.monotonic() + 30
            while _listing(upgrade_dir) == first and time.monotonic() < deadline:
                pass
        elif delay:
            time.sleep(delay)
        if victim is not None and victim.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(victim.proc.pid, signal.SIGKILL)

    def close(self) -> None:
        self.server.close()


SWITCH = -1.0  # a delay meaning "when var/upgrade starts to change"


def _listing(path: Path) -> tuple[str, ...]:
    try:
        top = sorted(os.listdir(path))
        inner = [f"{d}/{len(os.listdir(path / d))}" for d in top if (path / d).is_dir()]
    except OSError:
        return ("gone",)
    return (*top, *inner)


def nth(command: str, count: int, delay: float = 0.0) -> Callable[[str], float | None]:
    seen = [0]

    def rule(c: str) -> float | None:
        if c == command:
            seen[0] += 1
            if seen[0] == count:
                return delay
        return None

    return rule


def package(
    lab: Lab, out: Path, tag: str, members: int, version: str
) -> tuple[Path, dict[str, str]]:
    """A signed WPK with ``members`` small files under ``tag/``, a 300 KiB blob and the demo
    installer (which moves the agent to ``version``); returns it and the expected
    ``var/upgrade`` content (path -> sha256)."""
    files: dict[str, bytes] = {"upgrade.sh": INSTALLER.encode(), "VERSION": f"{version}\n".encode()}
    files["blob.bin"] = os.urandom(300 << 10)
    src = out / f"src-{tag}"
    shutil.rmtree(src, ignore_errors=True)
    (src / tag).mkdir(parents=True)
    paths = []
    for name, content in files.items():
        (src / name).write_bytes(content)
        paths.append(src / name)
    for i in range(members):
        (src / tag / f"f{i:05d}").write_bytes(f"{tag}{i}".encode())
    paths.append(src / tag)
    path = out / f"{tag}-{version}.wpk"
    wpk.pack(path, lab.signer.cert, lab.signer.key, paths, installer="upgrade.sh")
    with tempfile.TemporaryDirectory() as tmp:
        wpk.unpack(path, Path(tmp) / "u")
        expected = tree_snapshot(Path(tmp) / "u")
    return path, expected


def install_state(upgrade_dir: Path, packages: dict[str, dict[str, str]]) -> str:
    """Which package ``var/upgrade`` holds: a package name, ``empty``, or ``PARTIAL ...``."""
    now = tree_snapshot(upgrade_dir, skip=("upgrade_result",))
    if not now:
        return "empty"
    for name, expected in packages.items():
        if now == expected:
            return name
    a = sum(1 for k in now if k.startswith("a/"))
    b = sum(1 for k in now if k.startswith("b/"))
    return f"PARTIAL ({len(now)} entries: {a} of a/, {b} of b/, top: {sorted(now)[:4]})"


def measure(size: Size) -> list[Figure]:
    fig = Figure("R3", "agent faults")
    root = scratch("r3")
    lab = Lab.create(root / "lab")
    members = size.pick(300, 2000)
    steps: list[tuple[str, Callable[[str], float | None] | None]] = [
        ("open", nth("open", 1)),
        ("write", nth("write", 3)),
        ("close", nth("close", 1)),
        ("sha1", nth("sha1", 1)),
        ("upgrade (at once)", nth("upgrade", 1)),
    ]
    delays = [] if not size.full else sorted(random.uniform(0, 1) for _ in range(12))
    steps += [(f"upgrade (+{d * 1000:.0f} ms)", nth("upgrade", 1, d)) for d in delays]
    steps += [
        ("upgrade (var/upgrade changing)", nth("upgrade", 1, SWITCH))
        for _ in range(size.pick(1, 6))
    ]
    steps.append(("after install, before report", None))
    builds = [package(lab, root, "ab"[i % 2], members, f"v4.9.{i + 1}") for i in range(len(steps))]
    packages = {p.name: want for p, want in builds}
    config = manager_config(
        root / "manager",
        upgrade={
            "command_timeout": 10,
            "open_attempts": 10,
            "open_retry_delay": 0.5,
            "resume_timeout": 20,
        },
        task_manager={"task_timeout": 60, "sweep_interval": 1},
    )
    with ManagerHarness(config) as harness:
        host, port = harness.transport_address.split(":")
        proxy = KillProxy((host, int(port)))
        agent = AgentProc(
            root / "agent",
            31,
            f"127.0.0.1:{proxy.port}",
            ca_store=lab.ca.cert,
            result_wait=1.0,  # the installer's result must be on disk before it is read
            reconnect_max=0.2,
        )
        upgrade_dir = agent.home / "var" / "upgrade"
        agent.start()
        try:
            for (label, rule), (path, _) in zip(steps, builds, strict=True):
                run_step(fig, harness, proxy, agent, label, rule, path)
                state = install_state(upgrade_dir, packages)
                leftovers = sorted(
                    p.name for p in (agent.home / "var").iterdir() if ".unpack-" in p.name
                )
                if state.startswith("PARTIAL"):
                    fig.fail(f"{label}: var/upgrade holds a {state}")
                if leftovers:
                    fig.notes.append(f"{label}: temporary unpack directories left: {leftovers}")
        finally:
            agent.stop()
            proxy.close()
    return [fig]


def run_step(
    fig: Figure,
    harness: ManagerHarness,
    proxy: KillProxy,
    agent: AgentProc,
    label: str,
    rule: Callable[[str], float | None] | None,
    package_path: Path,
) -> None:
    assert harness.manager is not None
    hub = harness.manager.hub
    if not agent.alive():
        agent.start()
    wait_until(lambda: hub.link(agent.agent_id) is not None, 30, "the agent connected")
    time.sleep(1.3)  # the start-up result check (result_wait) opens the gate
    result_file = agent.home / "var" / "upgrade" / "upgrade_result"
    if rule is not None:
        proxy.arm(agent, rule)
    else:
        proxy.arm(agent, lambda c: None)
    reply = harness.upgrade(
        {
            "origin": {"module": "api"},
            "command": "upgrade_custom",
            "parameters": {"agents": [agent.agent_id], "file_path": str(package_path)},
        }
    )
    item = reply["data"][0]
    if item.get("error") != 0:
        fig.fail(f"{label}: request refused: {item}")
        return
    task_id = item["task_id"]
    killed_at = None
    if rule is None:
        # kill after the installer wrote its result, before the restarted agent reports
        try:
            wait_until(result_file.exists, 60, "the installer's result file", step=0.01)
            with contextlib.suppress(ProcessLookupError):
                assert agent.proc is not None
                os.killpg(agent.proc.pid, signal.SIGKILL)
            killed_at = "after the result file"
        except TimeoutError:
            fig.fail(f"{label}: the installer never wrote its result")
    else:
        try:
            wait_until(proxy.killed.is_set, 60, f"the kill at {label}", step=0.01)
            killed_at = label
        except TimeoutError:
            fig.fail(f"{label}: the step never came (commands seen: {proxy.commands[-5:]})")
    if agent.proc is not None:
        with contextlib.suppress(Exception):
            agent.proc.wait(10)
    time.sleep(0.2)
    agent.start()  # as its service manager would
    deadline = time.monotonic() + 120
    final: dict[str, Any] = {}
    while time.monotonic() < deadline:
        (final,) = harness.result([agent.agent_id])
        if final.get("task_id") == task_id and final.get("status") in FINAL:
            break
        time.sleep(0.2)
    # an installer that did start may still restart the agent and report: wait for it
    version = package_path.stem.split("-", 1)[1]
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: agent.connected() and agent.alive(), 30, "the agent back")
    time.sleep(1)
    (final,) = harness.result([agent.agent_id])
    installed = (agent.home / "etc" / "version").read_text().strip() == version
    history = harness.store.history(task_id)
    path = " -> ".join(c.to_status.display for c in history)
    status = final.get("status")
    reason = final.get("error_msg") or ""
    resumed = any("resum" in (c.reason or "").lower() for c in history)
    good = (status == "Updated" and installed) or (status == "Error" and bool(reason))
    if status == "Error" and installed:
        good = False
        reason += " BUT THE AGENT INSTALLED IT"
    outcome = f"{status}{' (resumed)' if resumed else ''}; history {path}; {reason}"[:300]
    if good:
        fig.ok()
        fig.notes.append(f"killed at {killed_at}: {outcome}")
    else:
        fig.fail(f"killed at {killed_at}: task ended {outcome}")
