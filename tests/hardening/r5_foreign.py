"""R5: foreign commands. Every attempt must be refused, and refused in the log.

* an agent claiming another agent's id over mutual TLS (hello id != certificate id, no client
  certificate, a certificate of another CA, a certificate naming no agent);
* a connected agent sending anything but ``upgrade_update_status`` about itself (D6): other
  commands, reports naming other agents, reports for itself plus others;
* path traversal in ``upgrade_custom``: ``file_path`` (``../../etc/passwd.wpk`` and friends)
  and ``installer`` (``../x``, absolute, hidden ``..``): refused at request time, or the task
  ends Error before any file or ``upgrade`` command reaches the agent;
* the three local sockets (manager upgrade and task sockets, the agent's socket) opened by an
  unprivileged user (``nobody`` via ``os.setuid`` in a subprocess): refused by the mode 0660.
  A control run with the same user in the socket's group must connect, so the refusal comes
  from the mode and not from an untraversable directory.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hardlib import (
    AgentProc,
    Figure,
    Lab,
    LogWatch,
    Size,
    frame,
    free_port,
    scratch,
    task_snapshot,
)
from r1_fuzz import read_frames

from wpk_upgrade.models import AgentInfo, TaskStatus
from wpk_upgrade.testing.harness import ManagerHarness, ScriptedAgent, json_agent, manager_config

PLATFORM = {"os_platform": "ubuntu", "os_major": "22", "os_minor": "04", "os_arch": "x86_64"}


def _hello(agent_id: int) -> bytes:
    hello = {"type": "hello", "agent": {"id": agent_id, "name": "x", **PLATFORM}, "features": []}
    return frame(json.dumps(hello).encode())


# --------------------------------------------------------------------------- identity


def identity_claims(fig: Figure, lab: Lab, root: Path) -> None:
    """Mutual TLS: every agent claiming an identity it does not hold is refused and logged."""
    server = lab.tls_pair("manager", "server")
    agent51 = lab.tls_pair("agent:051", "client")
    nobody = lab.tls_pair("not an agent", "client")
    from wpk_upgrade import pki

    other_ca = pki.create_ca(root / "other-ca", common_name="attacker CA")
    forged = pki.issue_certificate(
        other_ca.cert, other_ca.key, root / "other", "agent:052", "client", basename="forged"
    )
    options = {
        "listen": "127.0.0.1:0",
        "heartbeat": 2.0,
        "tls": True,
        "ca": str(lab.ca.cert),
        "cert": str(server.cert),
        "key": str(server.key),
    }
    config = manager_config(root / "manager-tls", transport={"name": "tcp", "options": options})
    with LogWatch() as watch, ManagerHarness(config) as harness:
        host, port = harness.transport_address.split(":")

        def attempt(cert: Any, claimed: int, what: str) -> None:
            context = ssl.create_default_context(cafile=str(lab.ca.cert))
            context.check_hostname = False
            if cert is not None:
                context.load_cert_chain(str(cert.cert), str(cert.key))
            mark = watch.mark()
            answer: Any = None
            try:
                with socket.create_connection((host, int(port)), 10) as raw:
                    with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                        tls.sendall(_hello(claimed))
                        answer, _ = read_frames(tls, lambda m: True, 10)
            except (ssl.SSLError, OSError):
                answer = None  # the handshake itself was refused
            refused = answer is None or answer.get("type") == "refused"
            connected = harness.manager is not None and harness.manager.hub.link(claimed)
            time.sleep(0.05)
            logged = [m for m in watch_lines(watch, mark) if "refused" in m]
            fig.check(
                refused and not connected and bool(logged),
                f"identity: {what}: answer {answer!r}, connected {bool(connected)}, "
                f"logged {logged[:1]}",
            )

        attempt(agent51, 52, "certificate of agent 051 claiming 052")
        attempt(agent51, 1, "certificate of agent 051 claiming 001")
        attempt(nobody, 51, "certificate naming no agent")
        attempt(forged, 52, "certificate of another CA")
        attempt(None, 51, "no client certificate")
        # the control: the right identity is welcome
        context = ssl.create_default_context(cafile=str(lab.ca.cert))
        context.check_hostname = False
        context.load_cert_chain(str(agent51.cert), str(agent51.key))
        with socket.create_connection((host, int(port)), 10) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(_hello(51))
                answer, _ = read_frames(tls, lambda m: True, 10)
        if not (answer and answer.get("type") == "welcome"):
            fig.fail(f"identity control: agent 051 with its own certificate got {answer!r}")


# --------------------------------------------------------------------------- D6


def foreign_events(fig: Figure, root: Path) -> None:
    """A connected agent (61) tries to act on agent 62's running task or to run commands."""
    with LogWatch() as watch, ManagerHarness(manager_config(root / "manager-d6")) as harness:
        store = harness.store
        store.upsert_agent(AgentInfo(agent_id=62, name="victim", version="v4.8.0", **PLATFORM))
        (victim,) = store.create_tasks([62], "node01", "upgrade_module", "upgrade", None)
        store.set_task_status(victim.task_id, "node01", TaskStatus.IN_PROGRESS, None, "seed")
        host, port = harness.transport_address.split(":")
        before = task_snapshot(store)
        messages: list[tuple[str, dict[str, Any]]] = [
            (
                "report about another agent",
                {
                    "command": "upgrade_update_status",
                    "parameters": {"agents": [62], "status": "Done"},
                },
            ),
            (
                "report about itself and another",
                {
                    "command": "upgrade_update_status",
                    "parameters": {"agents": [61, 62], "status": "Failed"},
                },
            ),
            (
                "report with the id as text",
                {
                    "command": "upgrade_update_status",
                    "parameters": {"agents": ["62"], "status": "Done"},
                },
            ),
            ("an upgrade request", {"command": "upgrade", "parameters": {"agents": [62]}}),
            (
                "an upgrade_custom request",
                {
                    "command": "upgrade_custom",
                    "parameters": {"agents": [62], "file_path": "/x.wpk"},
                },
            ),
            ("a result query", {"command": "upgrade_result", "parameters": {"agents": [62]}}),
            ("a cancel", {"command": "upgrade_cancel", "parameters": {"agents": [62]}}),
            ("a task-socket command", {"command": "upgrade_cancel_tasks", "parameters": {}}),
            ("an admin command", {"command": "tasks_list", "parameters": {}}),
        ]
        with socket.create_connection((host, int(port)), 10) as sock:
            sock.sendall(_hello(61))
            answer, _ = read_frames(sock, lambda m: True, 10)
            assert answer == {"type": "welcome"}, answer
            for ident, (what, message) in enumerate(messages, 1):
                mark = watch.mark()
                sock.sendall(
                    frame(json.dumps({"type": "event", "id": ident, "message": message}).encode())
                )
                reply, _ = read_frames(
                    sock, lambda m, i=ident: m.get("type") == "event_reply" and m["id"] == i, 10
                )
                inner = reply.get("reply") if reply else None
                refused = isinstance(inner, dict) and inner.get("error", 0) != 0
                time.sleep(0.05)
                logged = any("refused" in line for line in watch_lines(watch, mark))
                unchanged = task_snapshot(store) == before
                fig.check(
                    refused and logged and unchanged,
                    f"D6: {what}: reply {inner!r}, logged {logged}, tasks unchanged {unchanged}",
                )


def watch_lines(watch: LogWatch, mark: tuple[int, int]) -> list[str]:
    """The messages logged since ``mark`` (kept by the watch)."""
    return watch.messages[mark[0] :]


# --------------------------------------------------------------------------- traversal


def traversal(fig: Figure, lab: Lab, root: Path) -> None:
    """``upgrade_custom`` with traversal in ``file_path`` or ``installer``."""
    allowed = root / "allowed"
    allowed.mkdir()
    good = lab.wpk(allowed / "good.wpk", {"upgrade.sh": b"#!/bin/sh\nexit 0\n"})
    outside = lab.wpk(root / "outside.wpk", {"upgrade.sh": b"#!/bin/sh\nexit 0\n"})
    (allowed / "link.wpk").symlink_to(outside)
    config = manager_config(
        root / "manager-traversal",
        sources={"custom": {"allowed_dirs": [str(allowed)]}},
        upgrade={"command_timeout": 5, "open_attempts": 1},
    )
    attempts: list[tuple[str, dict[str, Any]]] = [
        ("file_path ../../etc/passwd.wpk", {"file_path": "../../etc/passwd.wpk"}),
        ("file_path with .. inside", {"file_path": f"{allowed}/../outside.wpk"}),
        ("file_path relative", {"file_path": "allowed/good.wpk"}),
        ("file_path outside allowed_dirs", {"file_path": str(outside)}),
        ("file_path symlink leaving allowed_dirs", {"file_path": str(allowed / "link.wpk")}),
        ("file_path /etc/passwd", {"file_path": "/etc/passwd"}),
        ("installer ../x", {"file_path": str(good), "installer": "../x"}),
        ("installer /bin/sh", {"file_path": str(good), "installer": "/bin/sh"}),
        ("installer a/../../x.sh", {"file_path": str(good), "installer": "a/../../x.sh"}),
        ("installer ..\\x", {"file_path": str(good), "installer": "..\\x"}),
        ("installer ../../etc/passwd", {"file_path": str(good), "installer": "../../etc/passwd"}),
    ]
    with LogWatch() as watch, ManagerHarness(config) as harness:
        info = AgentInfo(agent_id=71, name="t", version="v4.8.0", **PLATFORM)
        with ScriptedAgent(harness, info, json_agent()) as agent:
            for what, params in attempts:
                agent.received.clear()
                mark = watch.mark()
                reply = harness.upgrade(
                    {
                        "origin": {"module": "api"},
                        "command": "upgrade_custom",
                        "parameters": {"agents": [71], **params},
                    }
                )
                items = reply.get("data", [])
                item = items[0] if items else {}
                outcome = "refused at request time"
                if reply["error"] == 0 and item.get("error") == 0:
                    try:
                        (final,) = harness.wait_final([71], 15)
                    except AssertionError:
                        (final,) = harness.result([71])
                        harness.task(
                            {
                                "origin": {"module": "api"},
                                "command": "upgrade_cancel",
                                "parameters": {"agents": [71]},
                            }
                        )
                    outcome = f"task {final['status']}: {final.get('error_msg')}"
                    ok_task = final["status"] == "Error"
                else:
                    ok_task = True
                commands = [json.loads(p)["command"] for t, p in agent.received if t == "upgrade"]
                reached = [c for c in commands if c in ("open", "write", "upgrade")]
                time.sleep(0.05)
                lines = watch_lines(watch, mark)
                logged = any(
                    ("refused" in x or "failed" in x or "invalid" in x.lower()) for x in lines
                )
                fig.check(
                    ok_task and not reached and logged,
                    f"traversal: {what}: {outcome}; commands reaching the agent {reached}; "
                    f"logged {logged}",
                )


# --------------------------------------------------------------------------- socket modes


PROBE = r"""
import os, socket, sys
gid = int(sys.argv[2])
os.setgroups([])
os.setgid(gid)
os.setuid(65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("refused")
except OSError as exc:
    print(f"error {exc}")
else:
    print("connected")
"""


def socket_modes(fig: Figure, root: Path) -> None:
    """The three local sockets as ``nobody``: refused; as ``nobody`` in the group: allowed."""
    if os.geteuid() != 0:
        fig.notes.append("not root: cannot switch to nobody; socket-mode check skipped")
        return
    with ManagerHarness(manager_config(root / "manager-modes")) as harness:
        agent = AgentProc(root / "agent-modes", 81, f"127.0.0.1:{free_port()}").start()
        try:
            agent.wait_serving()
            for name, path in (
                ("upgrade socket", harness.config.upgrade_socket),
                ("task socket", harness.config.task_socket),
                ("agent socket", agent.socket),
            ):
                mode = stat.S_IMODE(path.stat().st_mode)
                group = path.stat().st_gid
                outsider = _probe(path, 65534)
                member = _probe(path, group)
                fig.check(
                    mode == 0o660 and outsider == "refused" and member == "connected",
                    f"{name}: mode {mode:o}, nobody: {outsider}, nobody in group {group}: {member}",
                )
        finally:
            agent.stop()


def _probe(path: Path, gid: int) -> str:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(path), str(gid)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return (out.stdout.strip() or out.stderr.strip()[-200:]) or "nothing"


def measure(size: Size) -> list[Figure]:
    fig = Figure("R5", "foreign commands")
    root = scratch("r5")
    lab = Lab.create(root / "lab")
    identity_claims(fig, lab, root)
    foreign_events(fig, root)
    traversal(fig, lab, root)
    socket_modes(fig, root)
    return [fig]
