"""R1: fuzzing every socket, with generated (hypothesis) and hand-written hostile input.

Targets: the manager's upgrade and task sockets (a real manager node in this process, so its
crashes and log lines are seen directly), the agent's local socket (a real agent process), and
the tcp transport's frames: ``hello`` and ``event`` frames sent to the manager, ``request``
frames sent to a real agent process by a fake manager. Slow clients (one byte per second) and
idle connections must not delay anyone else.

For every input: no crash (no exception escaping a handler, processes alive), a coded reply
(or, for a frame that cannot be answered, the connection closed; never a hang), the next valid
request served, the stored tasks unchanged when the input was refused, and at most
``LOG_LINES_PER_MESSAGE`` log lines / ``LOG_BYTES_PER_MESSAGE`` bytes of log caused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fuzzgen import AGENT_COMMANDS, MANAGER_COMMANDS, Case, case_strategy, nasties, run_examples
from hardlib import (
    HEADER,
    LOG_BYTES_PER_MESSAGE,
    LOG_LINES_PER_MESSAGE,
    AgentProc,
    Figure,
    LogWatch,
    Size,
    accepted,
    exchange,
    frame,
    free_port,
    is_envelope,
    parse_reply,
    scratch,
    task_snapshot,
    wait_until,
)
from hypothesis import strategies as st

from wpk_upgrade.models import AgentInfo, TaskParams
from wpk_upgrade.testing.harness import ManagerHarness, manager_config
from wpk_upgrade.untrusted import loads

AGENT = AgentInfo(
    agent_id=8,
    name="victim",
    version="v4.8.0",
    os_platform="ubuntu",
    os_major="22",
    os_minor="04",
    os_arch="x86_64",
    connection_status="active",
    node="node01",
)

UPGRADE_PROBE = {
    "origin": {"module": "api"},
    "command": "upgrade_result",
    "parameters": {"agents": [8]},
}
TASK_PROBE = {
    "origin": {"module": "api"},
    "command": "upgrade_result",
    "parameters": {"agents": [8]},
}


# --------------------------------------------------------------------------- a framed target


@dataclass
class Target:
    """A framed UNIX socket under test and how to judge its answers."""

    name: str
    path: Path
    limit: int
    reply_ok: Callable[[Any], bool]
    probe: Callable[[], str | None]  # None when the next valid request is served
    alive: Callable[[], bool]
    state: Callable[[], Any] | None = None
    logs: Callable[[], tuple[int, int]] | None = None
    crashes: Callable[[], int] | None = None
    settle: Callable[[], None] | None = None  # after an accepted input: let its work finish


def judge(target: Target, fig: Figure, case: Case) -> None:
    """Send one case, then the probe; count one attempt."""
    before = target.state() if target.state else None
    mark = target.logs() if target.logs else (0, 0)
    crashed = target.crashes() if target.crashes else 0
    problems: list[str] = []
    reply: Any = None
    try:
        raw = exchange(target.path, case.wire(target.limit), timeout=20)
    except TimeoutError as exc:
        problems.append(f"hang: {exc}")
        raw = b""
    except OSError as exc:
        problems.append(f"cannot connect: {exc}")
        raw = b""
    if raw:
        try:
            reply = parse_reply(raw)
            if not target.reply_ok(reply):
                problems.append(f"reply is not a coded reply: {raw[:200]!r}")
        except ValueError as exc:
            problems.append(f"unreadable reply ({exc}): {raw[:200]!r}")
    elif case.must_answer(target.limit) and not problems:
        problems.append("no reply to a whole frame")
    if not target.alive():
        problems.append("the server process died")
    else:
        why = target.probe()
        if why is not None:
            problems.append(f"next valid request not served: {why}")
    if target.crashes and target.crashes() > crashed:
        problems.append("an exception escaped (crash report in the log)")
    if target.state is not None and not (reply is not None and accepted(reply)):
        after = target.state()
        if after != before:
            problems.append("a refused input changed the stored tasks")
    elif target.settle is not None:
        target.settle()
    if target.logs:
        now = target.logs()
        lines, size = now[0] - mark[0], now[1] - mark[1]
        if lines > LOG_LINES_PER_MESSAGE or size > LOG_BYTES_PER_MESSAGE:
            problems.append(f"log flooding: {lines} lines, {size} bytes for one input")
    if problems:
        fig.fail(f"{target.name}: {case.describe()}: {'; '.join(problems)}")
    else:
        fig.ok()


# --------------------------------------------------------------------------- manager sockets


def manager_target(
    harness: ManagerHarness, watch: LogWatch, which: str, state: Callable[[], Any]
) -> Target:
    path = harness.config.upgrade_socket if which == "upgrade" else harness.config.task_socket
    probe_msg = UPGRADE_PROBE if which == "upgrade" else TASK_PROBE

    def probe() -> str | None:
        try:
            raw = exchange(path, frame(json.dumps(probe_msg).encode()), timeout=20)
            reply = parse_reply(raw)
        except (OSError, ValueError) as exc:
            return str(exc)
        if not is_envelope(reply) or reply["error"] != 0:
            return f"probe answered {reply!r}"[:300]
        return None

    def alive() -> bool:
        return harness.loop.is_running()

    def logs() -> tuple[int, int]:
        return watch.mark()

    def settle() -> None:
        """Wait until the stored tasks stop changing (tasks an accepted request created run
        and fail in the background: their agents are not connected)."""
        last, stable, deadline = state(), 0, time.monotonic() + 15
        while stable < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
            now = state()
            stable = stable + 1 if now == last else 0
            last = now

    return Target(
        name=f"{which} socket",
        path=path,
        limit=harness.config.max_message_size,
        reply_ok=is_envelope,
        probe=probe,
        alive=alive,
        state=state,
        logs=logs,
        crashes=lambda: len(watch.crashes),
        settle=settle,
    )


def seed_tasks(harness: ManagerHarness) -> None:
    """Something garbage could damage: agent 8 connected (in the store) with a running task,
    agent 9 with a finished one, agent 10 with a queued one of another node."""
    store = harness.store
    store.upsert_agent(AGENT)
    store.upsert_agent(AgentInfo(agent_id=9, name="other", version="v4.8.0"))
    store.upsert_agent(AgentInfo(agent_id=10, name="far", version="v4.8.0"))
    from wpk_upgrade.models import TaskStatus

    (running,) = store.create_tasks([8], "node01", "upgrade_module", "upgrade", None)
    store.set_task_status(running.task_id, "node01", TaskStatus.IN_PROGRESS, None, "seed")
    (done,) = store.create_tasks([9], "node01", "upgrade_module", "upgrade", None)
    store.set_task_status(done.task_id, "node01", TaskStatus.IN_PROGRESS, None, "seed")
    store.set_task_status(done.task_id, "node01", TaskStatus.FAILED, "seeded failure", "seed")
    store.create_tasks([10], "node02", "upgrade_module", "upgrade", TaskParams(command="upgrade"))


def manager_nasties(which: str, limit: int, full: bool = False) -> list[Case]:
    """Socket-specific hand-written inputs: stored text that cannot be encoded back (lone
    surrogates, NUL), other nodes' names, traversal in paths."""
    out = nasties(("upgrade",) if which == "upgrade" else ("upgrade_result",), limit, full)
    extra: list[dict[str, Any]] = []
    if which == "upgrade":
        extra = [
            {"command": "upgrade_custom", "parameters": {"agents": [8], "file_path": "\ud800"}},
            {
                "command": "upgrade_custom",
                "parameters": {"agents": [8], "file_path": "../../etc/passwd.wpk"},
            },
            {"command": "upgrade", "parameters": {"agents": [8], "version": "\udc80\x00"}},
            {"command": "upgrade", "parameters": {"agents": [8], "wpk_repo": "\x00\ud800"}},
            {
                "command": "upgrade_update_status",
                "parameters": {"agents": [9], "status": "\ud800", "message": "\ud800"},
            },
            {"origin": {"module": "\ud800"}, "command": "upgrade", "parameters": {"agents": [8]}},
        ]
    else:
        extra = [
            {
                "origin": {"name": "node01", "module": "x"},
                "command": "upgrade_update_status",
                "parameters": {"agents": [8], "status": "Failed", "error_msg": "\ud800"},
            },
            {
                "origin": {"name": "\ud800\x00", "module": "\x00"},
                "command": "upgrade_get_status",
                "parameters": {"agents": [8]},
            },
            {
                "origin": {"name": "\ud800", "module": "api"},
                "command": "upgrade_cancel_tasks",
                "parameters": {},
            },
            {"command": "tasks_list", "parameters": {"statuses": ["\ud800"], "limit": -1}},
            {"command": "tasks_list", "parameters": {"limit": 10**30, "since": 1e400}},
            {"command": "task_history", "parameters": {"task_id": 2**70}},
            {"command": "agents_list", "parameters": {"agents": list(range(5000))}},
            {"command": "agents_list", "parameters": {"target": {"wpk_repo": "\x00"}}},
        ]
    return out + [Case(json.dumps(m).encode()) for m in extra]


def fuzz_manager(size: Size) -> list[Figure]:
    """Both manager sockets of one in-process manager node."""
    figures = []
    home = scratch("r1-manager")
    config = manager_config(home, upgrade={"command_timeout": 0.5, "open_attempts": 1})
    rss_before = peak_rss_mib()
    with LogWatch() as watch, ManagerHarness(config) as harness:
        seed_tasks(harness)

        def state() -> Any:
            return task_snapshot(harness.store)

        for which, seed_value in (("upgrade", 11), ("task", 12)):
            fig = Figure("R1", f"fuzzing {which} socket")
            target = manager_target(harness, watch, which, state)
            for case in manager_nasties(which, target.limit, size.full):
                judge(target, fig, case)
            commands = MANAGER_COMMANDS if which == "task" else MANAGER_COMMANDS[:4]
            run_examples(
                case_strategy(commands),
                size.pick(100, 10_000),
                seed_value,
                lambda case, t=target, f=fig: judge(t, f, case),  # type: ignore[misc]
            )
            figures.append(fig)
        slow = Figure("R1", "slow and idle clients (manager sockets)")
        slow_clients(
            harness.config.upgrade_socket,
            frame(json.dumps(UPGRADE_PROBE).encode()),
            slow,
            size,
        )
        figures.append(slow)
        figures[0].notes.append(
            f"peak RSS of the process running the manager: {rss_before:.0f} MiB before, "
            f"{peak_rss_mib():.0f} MiB after both sockets; {watch.lines} log lines, "
            f"longest {watch.biggest} characters"
        )
    return figures


def peak_rss_mib(pid: int | None = None) -> float:
    """Peak resident memory (VmHWM) of ``pid`` (this process by default), in MiB."""
    try:
        text = Path(f"/proc/{pid or 'self'}/status").read_text()
    except OSError:
        return float("nan")
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --------------------------------------------------------------------------- slow clients


def slow_clients(
    path: Path | tuple[str, int],
    request: bytes,
    fig: Figure,
    size: Size,
    good: Callable[[Any], bool] = is_envelope,
) -> None:
    """``n`` clients trickle a request one byte per second and ``idle`` clients connect and
    say nothing, while a fast client must keep being answered (``good``) within a second."""
    slow_n = size.pick(5, 50)
    idle_n = size.pick(100, 1000)
    seconds = size.pick(3, 10)
    family = socket.AF_UNIX if isinstance(path, Path) else socket.AF_INET
    target = str(path) if isinstance(path, Path) else path
    stop = threading.Event()
    socks: list[socket.socket] = []

    def trickle(sock: socket.socket) -> None:
        data = request
        for i in range(len(data)):
            if stop.wait(1.0):
                return
            try:
                sock.send(data[i : i + 1])
            except OSError:
                return

    threads = []
    try:
        for _ in range(idle_n):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.connect(target)
            socks.append(s)
        for _ in range(slow_n):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.connect(target)
            socks.append(s)
            t = threading.Thread(target=trickle, args=(s,), daemon=True)
            t.start()
            threads.append(t)
        deadline = time.monotonic() + seconds
        worst = 0.0
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                reply = parse_reply(exchange(path, request, timeout=10))
                took = time.monotonic() - started
                worst = max(worst, took)
                fig.check(
                    good(reply) and took < 1.0,
                    f"fast client answered in {took:.2f} s beside slow clients: {reply!r}"[:300],
                )
            except (OSError, ValueError) as exc:
                fig.fail(f"fast client not served beside slow clients: {exc}")
            time.sleep(0.05)
        fig.notes.append(
            f"{slow_n} clients at 1 byte/s and {idle_n} idle connections; fast client worst "
            f"latency {worst * 1000:.0f} ms"
        )
    finally:
        stop.set()
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()
        for t in threads:
            t.join(5)


# --------------------------------------------------------------------------- agent local socket


def agent_reply_ok(reply: Any) -> bool:
    return (
        isinstance(reply, dict)
        and isinstance(reply.get("error"), int)
        and isinstance(reply.get("message"), str)
        and reply.get("data") == []
    )


PROBE_FILE = "hardening-probe.bin"
PROBE_CONTENT = b"probe content\n"


def agent_probe(agent: AgentProc) -> Callable[[], str | None]:
    import hashlib

    expected = hashlib.sha1(PROBE_CONTENT).hexdigest()
    request = frame(json.dumps({"command": "sha1", "parameters": {"file": PROBE_FILE}}).encode())

    def probe() -> str | None:
        try:
            reply = parse_reply(exchange(agent.socket, request, timeout=20))
        except (OSError, ValueError) as exc:
            return str(exc)
        if reply != {"error": 0, "message": expected, "data": []}:
            return f"probe answered {reply!r}"[:300]
        return None

    return probe


class StderrLog:
    """Line and byte counts of an agent's stderr (its log), and tracebacks in it."""

    def __init__(self, agent: AgentProc) -> None:
        self.agent = agent

    def mark(self) -> tuple[int, int]:
        text = self.agent.log
        return text.count("\n"), len(text)

    def crashes(self) -> int:
        text = self.agent.log
        return text.count("Traceback") + text.count("Unhandled exception")


def agent_sandbox(agent: AgentProc) -> Callable[[], Any]:
    """The agent home except what commands may legitimately change (incoming, run, logs)."""
    from hardlib import tree_snapshot

    def state() -> Any:
        return tree_snapshot(
            agent.home, skip=("var/incoming", "var/run", "logs", "agent.stderr", "queue")
        )

    return state


def fuzz_agent_socket(size: Size) -> list[Figure]:
    fig = Figure("R1", "fuzzing agent local socket")
    root = scratch("r1-agent")
    agent = AgentProc(root / "agent", 21, f"127.0.0.1:{free_port()}").start()
    try:
        agent.wait_serving()
        agent.open_gate()
        (agent.home / "var" / "incoming" / PROBE_FILE).write_bytes(PROBE_CONTENT)
        log = StderrLog(agent)
        sandbox = agent_sandbox(agent)
        target = Target(
            name="agent socket",
            path=agent.socket,
            limit=65536,
            reply_ok=agent_reply_ok,
            probe=agent_probe(agent),
            alive=agent.alive,
            state=sandbox,
            logs=log.mark,
            crashes=log.crashes,
        )
        extra = [
            {"command": "open", "parameters": {"mode": "wb", "file": "../../escape"}},
            {"command": "open", "parameters": {"mode": "wb", "file": "/tmp/x"}},
            {"command": "open", "parameters": {"mode": "wb", "file": "\ud800"}},
            {"command": "write", "parameters": {"file": "a", "buffer": "\ud800", "length": 1}},
            {"command": "write", "parameters": {"file": "a", "length": 2**70, "buffer": "QQ=="}},
            {"command": "upgrade", "parameters": {"file": "x", "installer": "../../bin/sh"}},
            {"command": "upgrade", "parameters": {"file": "x", "installer": "\x00"}},
            {"command": "sha1", "parameters": {"file": "." * 300}},
            {"command": "sha256", "parameters": {"file": "a" * 5000}},
        ]
        cases = nasties(("open",), 65536) + [Case(json.dumps(m).encode()) for m in extra]
        for case in cases:
            judge(target, fig, case)
        run_examples(
            case_strategy(AGENT_COMMANDS),
            size.pick(100, 10_000),
            21,
            lambda case: judge(target, fig, case),
        )
        assert agent.proc is not None
        fig.notes.append(f"peak RSS of the agent process: {peak_rss_mib(agent.proc.pid):.0f} MiB")
        slow = Figure("R1", "slow and idle clients (agent socket)")
        request = frame(
            json.dumps({"command": "sha1", "parameters": {"file": PROBE_FILE}}).encode()
        )
        slow_clients(agent.socket, request, slow, size)
        return [fig, slow]
    finally:
        agent.stop()


# --------------------------------------------------------------------------- transport frames


def hello(agent_id: int) -> dict[str, Any]:
    return {
        "type": "hello",
        "agent": {
            "id": agent_id,
            "name": "fuzz",
            "version": "v4.8.0",
            "os_platform": "ubuntu",
            "os_major": "22",
            "os_minor": "04",
            "os_arch": "x86_64",
        },
        "features": [],
    }


def wire_messages(kind: str) -> st.SearchStrategy[bytes]:
    """Transport frames: typed objects with garbage fields, or plain garbage."""
    from fuzzgen import encodings, json_values, messages

    inner = messages(MANAGER_COMMANDS + AGENT_COMMANDS)
    typed = st.fixed_dictionaries(
        {"type": st.sampled_from((kind, kind, kind, "ping", "pong", "response", "welcome"))},
        optional={
            "agent": st.fixed_dictionaries(
                {},
                optional={
                    "id": json_values | st.integers(-5, 2**33),
                    "name": json_values,
                    "version": json_values,
                    "os_platform": json_values,
                    "os_arch": json_values,
                },
            )
            | json_values,
            "features": st.lists(json_values, max_size=40) | json_values,
            "id": json_values | st.integers(0, 10),
            "message": inner,
            "target": st.sampled_from(("upgrade", "com", "x")) | json_values,
            "payload": inner.map(json.dumps) | json_values | st.text(max_size=50),
            "bin": json_values | st.integers(-5, 100),
        },
    )
    return encodings(typed)


def decoded(payload: bytes) -> Any:
    """What the transport makes of a frame (None when it must refuse the whole frame: then
    closing the connection is the right answer)."""
    try:
        return loads(payload, nul=True)
    except ValueError:
        return None


def read_frames(sock: socket.socket, until: Callable[[dict[str, Any]], bool], timeout: float):  # type: ignore[no-untyped-def]
    """Read frames until ``until(msg)``; returns (msg or None when closed, frames seen)."""
    sock.settimeout(timeout)
    seen = 0
    buf = b""
    deadline = time.monotonic() + timeout
    while True:
        while len(buf) >= 4:
            (n,) = HEADER.unpack(buf[:4])
            if len(buf) < 4 + n:
                break
            body, buf = buf[4 : 4 + n], buf[4 + n :]
            seen += 1
            msg = json.loads(body)
            if until(msg):
                return msg, seen
        if time.monotonic() > deadline:
            raise TimeoutError("no answer")
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            return None, seen
        if not chunk:
            return None, seen
        buf += chunk


def fuzz_transport_manager(size: Size) -> list[Figure]:
    """``hello`` frames (each on a new connection) and ``event`` frames (after a valid hello)
    sent to a manager's tcp transport."""
    hello_fig = Figure("R1", "fuzzing transport hello frames")
    event_fig = Figure("R1", "fuzzing transport event frames")
    home = scratch("r1-transport")
    with LogWatch() as watch, ManagerHarness(manager_config(home)) as harness:
        seed_tasks(harness)
        host, port = harness.transport_address.split(":")
        address = (host, int(port))

        def valid_hello_served() -> str | None:
            try:
                with socket.create_connection(address, 10) as s:
                    s.sendall(frame(json.dumps(hello(30)).encode()))
                    msg, _ = read_frames(s, lambda m: True, 10)
                    if msg is None or msg.get("type") != "welcome":
                        return f"valid hello answered {msg!r}"
            except (OSError, TimeoutError, ValueError) as exc:
                return f"valid hello: {exc}"
            return None

        def one_hello(data: bytes) -> None:
            crashed = len(watch.crashes)
            mark = watch.mark()
            problems = []
            try:
                with socket.create_connection(address, 10) as s:
                    s.sendall(data)
                    s.shutdown(socket.SHUT_WR)
                    msg, _ = read_frames(s, lambda m: True, 15)
                    if msg is not None and msg.get("type") not in ("refused", "welcome"):
                        problems.append(f"answered {msg!r}"[:200])
            except TimeoutError:
                problems.append("hang")
            except (OSError, ValueError) as exc:
                problems.append(f"unreadable answer: {exc}")
            why = valid_hello_served()
            if why:
                problems.append(why)
            if len(watch.crashes) > crashed:
                problems.append(f"crash: {watch.crashes[-1]}")
            lines, size_ = watch.since(mark)
            if lines > LOG_LINES_PER_MESSAGE or size_ > LOG_BYTES_PER_MESSAGE:
                problems.append(f"log flooding: {lines} lines, {size_} bytes")
            if problems:
                hello_fig.fail(f"hello {data[:120]!r}: {'; '.join(problems)}")
            else:
                hello_fig.ok()

        hello_nasties = [
            frame(b"[" * 60000),
            frame(b"{" * 60000),
            frame(
                json.dumps({"type": "hello", "agent": {"id": 5, "name": "x" * 900_000}}).encode()
            ),
            frame(json.dumps({**hello(5), "features": ["x"] * 100_000}).encode()),
            frame(json.dumps({"type": "hello", "agent": {"id": "9" * 4000}}).encode()),
            frame(b'{"type":"hello","agent":{"id":1e400}}'),
            frame(b"\xff\xfe"),
            HEADER.pack(0xFFFFFFFF) + b"x",
            HEADER.pack(1 << 20) + b"x" * 100,
            b"\x01",
            b"",
        ]
        for data in hello_nasties:
            one_hello(data)
        run_examples(
            wire_messages("hello"),
            size.pick(100, 10_000),
            31,
            lambda payload: one_hello(frame(payload)),
        )
        slow = Figure("R1", "slow and idle clients (transport)")
        slow_clients(
            address,
            frame(json.dumps(hello(31)).encode()),
            slow,
            size,
            lambda reply: isinstance(reply, dict) and reply.get("type") == "welcome",
        )

        # events after a valid hello, as agent 30 (agent 8 has a running task)
        state_before: list[Any] = [task_snapshot(harness.store)]
        conn: list[socket.socket | None] = [None]

        def connection() -> socket.socket:
            if conn[0] is None:
                s = socket.create_connection(address, 10)
                s.sendall(frame(json.dumps(hello(30)).encode()))
                msg, _ = read_frames(s, lambda m: True, 10)
                assert msg is not None and msg["type"] == "welcome", msg
                conn[0] = s
            return conn[0]

        ids = iter(range(1, 10**9))

        settled = [False]

        def one_event(data: bytes, expect_reply_to: int | None) -> None:
            if not settled[0]:
                # the hello phase's connections are still being logged as they close: let
                # those lines land before the first event's log volume is measured
                settled[0] = True
                deadline, last = time.monotonic() + 5, watch.mark()
                while time.monotonic() < deadline:
                    time.sleep(0.3)
                    if watch.mark() == last:
                        break
                    last = watch.mark()
            crashed = len(watch.crashes)
            mark = watch.mark()
            problems = []
            reply = None
            try:
                try:
                    s = connection()
                    s.sendall(data)
                except (BrokenPipeError, ConnectionResetError):  # dropped by the last input
                    conn[0] = None
                    s = connection()
                    s.sendall(data)
                if expect_reply_to is not None:

                    def answer(sock: socket.socket) -> Any:
                        got, _ = read_frames(
                            sock,
                            lambda m: (
                                m.get("type") == "event_reply" and m.get("id") == expect_reply_to
                            ),
                            15,
                        )
                        return got

                    reply = answer(s)
                    if reply is None:
                        # a client silent for three heartbeats is dropped (this one may have
                        # paused on a busy machine): once more, on a fresh connection
                        conn[0] = None
                        s = connection()
                        s.sendall(data)
                        reply = answer(s)
                    if reply is None:
                        problems.append("connection closed instead of an event_reply")
                    elif not is_envelope(reply.get("reply")):
                        problems.append(f"event_reply is not coded: {reply!r}"[:200])
            except TimeoutError:
                problems.append("no event_reply")
            except (OSError, ValueError) as exc:
                problems.append(f"{exc}")
            # next valid request: a ping answered with a pong (reconnecting if dropped)
            try:
                ident = next(ids)
                s.sendall(frame(json.dumps({"type": "ping", "id": ident}).encode()))
                pong, _ = read_frames(s, lambda m: m.get("type") == "pong", 10)
                if pong is None:
                    raise ConnectionError("closed")
            except (OSError, ConnectionError, TimeoutError, ValueError):
                with contextlib.suppress(OSError):
                    s.close()
                conn[0] = None
                if expect_reply_to is not None and not problems:
                    problems.append("a well-framed event dropped the connection")
                try:
                    connection()
                except (OSError, AssertionError, TimeoutError) as exc:
                    problems.append(f"cannot reconnect: {exc}")
            if len(watch.crashes) > crashed:
                problems.append(f"crash: {watch.crashes[-1]}")
            lines, size_ = watch.since(mark)
            if lines > LOG_LINES_PER_MESSAGE or size_ > LOG_BYTES_PER_MESSAGE:
                problems.append(f"log flooding: {lines} lines, {size_} bytes")
            after = task_snapshot(harness.store)
            if after != state_before[0]:
                inner = reply.get("reply") if isinstance(reply, dict) else None
                if not accepted(inner):
                    problems.append("a refused event changed the stored tasks")
                state_before[0] = after
            if problems:
                event_fig.fail(f"event {data[:120]!r}: {'; '.join(problems)}")
            else:
                event_fig.ok()

        def event_case(payload: bytes) -> None:
            msg = decoded(payload)
            expect = None
            if isinstance(msg, dict) and msg.get("type") == "event":
                ident = next(ids)
                msg["id"] = ident
                payload = json.dumps(msg).encode()
                expect = ident
            one_event(frame(payload), expect)

        def event(message: Any) -> bytes:
            return json.dumps({"type": "event", "id": 0, "message": message}).encode()

        event_nasties = [
            event(
                {
                    "command": "upgrade_update_status",
                    "parameters": {"agents": [8], "status": "Done"},
                }
            ),
            event(
                {"command": "upgrade_update_status", "parameters": {"agents": list(range(100_000))}}
            ),
            event({"command": "upgrade", "parameters": {"agents": [8]}}),
            event({"command": "x" * 500_000, "parameters": {}}),
            event({"command": "upgrade_update_status", "parameters": {"status": "\ud800"}}),
            event("[" * 50_000),
            b'{"type":"event","id":0,"message":' + b"[" * 60000,
            b"[" * 500_000,
            json.dumps({"type": "x" * 500_000}).encode(),
            b"\xff",
        ]
        for payload in event_nasties:
            event_case(payload)
        run_examples(wire_messages("event"), size.pick(100, 10_000), 32, event_case)
        if conn[0] is not None:
            conn[0].close()
    return [hello_fig, event_fig, slow]


class FakeManager:
    """A manager-side tcp endpoint driven by the test: accepts one agent at a time."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.conn: socket.socket | None = None

    def connection(self, timeout: float = 20) -> socket.socket:
        if self.conn is None:
            self.server.settimeout(timeout)
            conn, _ = self.server.accept()
            msg, _ = read_frames(conn, lambda m: True, timeout)
            assert msg is not None and msg.get("type") == "hello", msg
            conn.sendall(frame(b'{"type":"welcome"}'))
            self.conn = conn
        return self.conn

    def drop(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.close()
            self.conn = None

    def close(self) -> None:
        self.drop()
        self.server.close()


def fuzz_transport_agent(size: Size) -> list[Figure]:
    """``request`` frames sent by a fake manager to a real agent process."""
    fig = Figure("R1", "fuzzing transport request frames")
    fake = FakeManager()
    root = scratch("r1-agent-transport")
    agent = AgentProc(
        root / "agent", 22, f"127.0.0.1:{fake.port}", result_wait=0.1, reconnect_max=0.05
    ).start()
    log = StderrLog(agent)
    sandbox = agent_sandbox(agent)
    ids = iter(range(1, 10**9))
    import hashlib

    expected = hashlib.sha1(PROBE_CONTENT).hexdigest()
    try:
        agent.wait_serving()
        (agent.home / "var" / "incoming" / PROBE_FILE).write_bytes(PROBE_CONTENT)
        fake.connection()
        wait_until(agent.connected, 20, "the agent to connect")
        time.sleep(0.5)  # the start-up result check opens the gate

        def ask(s: socket.socket, msg: dict[str, Any], extra: bytes = b"") -> Any:
            s.sendall(frame(json.dumps(msg).encode()) + extra)
            ident = msg.get("id")
            answer, _ = read_frames(
                s, lambda m: m.get("type") == "response" and m.get("id") == ident, 15
            )
            return answer

        def probe() -> str | None:
            for _ in range(2):
                try:
                    s = fake.connection()
                    request = {
                        "type": "request",
                        "id": next(ids),
                        "target": "upgrade",
                        "payload": json.dumps(
                            {"command": "sha1", "parameters": {"file": PROBE_FILE}}
                        ),
                    }
                    answer = ask(s, request)
                    if answer is None:
                        raise ConnectionError("closed")
                    payload = json.loads(answer["payload"])
                    if payload.get("message") != expected:
                        return f"probe answered {answer!r}"[:300]
                    return None
                except (OSError, ConnectionError, TimeoutError, ValueError, AssertionError):
                    fake.drop()
            return "the agent does not serve a valid request any more"

        def one(payload: bytes, attachment: bytes | None) -> None:
            crashed = log.crashes()
            mark = log.mark()
            before = sandbox()
            problems = []
            msg = decoded(payload)
            expect = None
            if isinstance(msg, dict) and msg.get("type") == "request" and "bin" not in msg:
                expect = next(ids)
                msg["id"] = expect
                payload = json.dumps(msg).encode()
            try:
                s = fake.connection()
                data = frame(payload) + (frame(attachment) if attachment is not None else b"")
                s.sendall(data)
                if expect is not None:

                    def response(sock: socket.socket) -> Any:
                        got, _ = read_frames(
                            sock,
                            lambda m: m.get("type") == "response" and m.get("id") == expect,
                            15,
                        )
                        return got

                    answer = response(s)
                    if answer is None:  # dropped for silence (three heartbeats): once more
                        fake.drop()
                        s = fake.connection()
                        s.sendall(data)
                        answer = response(s)
                    if answer is None:
                        problems.append("connection closed instead of a response")
                    elif not isinstance(answer.get("payload"), str):
                        problems.append(f"response without a text payload: {answer!r}"[:200])
            except TimeoutError:
                problems.append("no response")
            except (OSError, ValueError) as exc:
                problems.append(str(exc))
                fake.drop()
            why = probe()
            if why:
                problems.append(why)
            if not agent.alive():
                problems.append("the agent process died")
            if log.crashes() > crashed:
                problems.append("traceback in the agent log")
            now = log.mark()
            lines, size_ = now[0] - mark[0], now[1] - mark[1]
            if lines > LOG_LINES_PER_MESSAGE or size_ > LOG_BYTES_PER_MESSAGE:
                problems.append(f"log flooding: {lines} lines, {size_} bytes")
            if sandbox() != before:
                problems.append("changed the agent home outside var/incoming")
            if problems:
                fig.fail(f"request {payload[:120]!r}: {'; '.join(problems)}")
            else:
                fig.ok()

        def request(payload: Any, target: Any = "upgrade", **extra: Any) -> bytes:
            return json.dumps(
                {"type": "request", "id": 0, "target": target, "payload": payload, **extra}
            ).encode()

        nasty = [
            (request("[" * 60000), None),
            (request('{"command":' * 20000), None),
            (request("x" * 900_000), None),
            (request(json.dumps({"command": "x" * 500_000, "parameters": {}})), None),
            (request("lock_restart " + "9" * 5000, "com"), None),
            (request("write 99999999999999999999 f x", "com"), None),
            (request("\ud800", "com"), None),
            (request('{"command":"write","parameters":{"buffer":"","length":0}}', bin=-1), b"x"),
            (request('{"command":"write","parameters":{"buffer":"","length":0}}', bin=10**30), b""),
            (request('{"buffer":"', bin=11), b"\x00" * 70000),
            (request(1), None),
            (request(None, None), None),
            (b"[" * 500_000, None),
            (b"\xff" * 10, None),
            (json.dumps({"type": "y" * 900_000}).encode(), None),
        ]
        for payload, attachment in nasty:
            one(payload, attachment)
        rng = random.Random(41)

        def generated(payload: bytes) -> None:
            attachment = None
            if b'"bin"' in payload and rng.random() < 0.5:
                attachment = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 300)))
            one(payload, attachment)

        run_examples(wire_messages("request"), size.pick(100, 10_000), 33, generated)
    finally:
        agent.stop()
        fake.close()
    return [fig]


def measure(size: Size) -> list[Figure]:
    figures = fuzz_manager(size)
    figures += fuzz_agent_socket(size)
    figures += fuzz_transport_manager(size)
    figures += fuzz_transport_agent(size)
    return figures


def total(figures: list[Figure]) -> Figure:
    """The R1 headline: every fuzzing figure summed."""
    out = Figure("R1", "fuzzing")
    for f in figures:
        out.tried += f.tried
        out.failed += f.failed
        out.failures += f.failures[: max(0, 30 - len(out.failures))]
    return out


if __name__ == "__main__":  # pragma: no cover - manual runs
    import sys

    figs = measure(Size(full="--full" in sys.argv))
    for f in figs:
        print(f.details())
    _ = asyncio
