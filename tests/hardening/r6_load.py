"""R6: load on the upgrade socket.

* ``clients`` concurrent clients each send ``requests`` requests (every other one an
  ``upgrade`` of the same agents, the rest ``upgrade_result``): every request answered with a
  coded reply; at every moment (sampled) and at the end exactly one active task per agent, and
  exactly one task created per agent over the whole run (the agents never finish: their
  simulators stay silent at ``lock_restart``).
* Slow repositories beside everyone else: requests naming a repository that accepts
  connections and never answers must not delay other clients (fault found here: they held every
  default worker thread, so every store call of the manager waited).
* One expensive request (an agent report naming as many agents as fit in a message) beside
  everyone else: other clients keep their latency.
"""

from __future__ import annotations

import contextlib
import json
import socket
import statistics
import threading
import time
from typing import Any

from hardlib import Figure, Size, is_envelope, scratch, send_json

from wpk_upgrade.models import AgentInfo, TaskStatus
from wpk_upgrade.testing.harness import ManagerHarness, ScriptedAgent, json_agent, manager_config

PLATFORM = {"os_platform": "ubuntu", "os_major": "22", "os_minor": "04", "os_arch": "x86_64"}
FAST = 1.0  # seconds a plain query may take beside the load


def _info(agent_id: int) -> AgentInfo:
    return AgentInfo(agent_id=agent_id, name=f"l{agent_id}", version="v4.8.0", **PLATFORM)


def concurrent_requests(fig: Figure, size: Size) -> None:
    clients = size.pick(10, 50)
    per_client = size.pick(20, 200)
    agent_ids = list(range(101, 101 + size.pick(3, 10)))
    root = scratch("r6")
    config = manager_config(
        root / "manager",
        upgrade={"command_timeout": 600, "installer_timeout": 600},
        task_manager={"task_timeout": 3600, "sweep_interval": 1},
    )
    with ManagerHarness(config) as harness, contextlib.ExitStack() as stack:
        for agent_id in agent_ids:
            stack.enter_context(
                ScriptedAgent(harness, _info(agent_id), json_agent(stall_at="lock_restart"))
            )
        path = harness.config.upgrade_socket
        package = root / "load.wpk"  # resolved locally; the push then stalls at lock_restart
        package.write_bytes(b"a package the silent agents never receive")
        created: dict[int, list[int]] = {a: [] for a in agent_ids}
        lock = threading.Lock()
        latencies: list[float] = []
        barrier = threading.Barrier(clients)
        stop_sampling = threading.Event()
        violations: list[str] = []

        def client(index: int) -> None:
            barrier.wait()
            for n in range(per_client):
                upgrade = (index + n) % 2 == 0
                message: dict[str, Any] = {
                    "origin": {"module": "api"},
                    "command": "upgrade_custom" if upgrade else "upgrade_result",
                    "parameters": {"agents": agent_ids},
                }
                if upgrade:
                    message["parameters"]["file_path"] = str(package)
                started = time.monotonic()
                try:
                    reply = send_json(path, message, timeout=60)
                except (OSError, ValueError) as exc:
                    with lock:
                        fig.fail(f"client {index} request {n}: not answered: {exc}")
                    continue
                took = time.monotonic() - started
                with lock:
                    latencies.append(took)
                    if not is_envelope(reply) or reply["error"] != 0:
                        fig.fail(f"client {index} request {n}: {reply!r}"[:300])
                        continue
                    fig.ok()
                    if upgrade:
                        for item in reply["data"]:
                            if item.get("error") == 0:
                                created[item["agent"]].append(item["task_id"])
                            elif item.get("error") != 10:
                                fig.fail(f"unexpected item {item!r}")

        def sample() -> None:
            while not stop_sampling.wait(0.1):
                # two queries: a task moving from one status to the other between them is
                # seen twice, so tasks are counted by id
                active = [
                    t
                    for status in (TaskStatus.PENDING, TaskStatus.IN_PROGRESS)
                    for t in harness.store.tasks_in_status(None, status)
                ]
                ids: dict[int, set[int]] = {}
                for task in active:
                    ids.setdefault(task.agent_id, set()).add(task.task_id)
                for agent_id, tasks in ids.items():
                    if len(tasks) > 1:
                        violations.append(f"agent {agent_id} had active tasks {sorted(tasks)}")

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        began = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        elapsed = time.monotonic() - began
        stop_sampling.set()
        sampler.join(5)
        for v in sorted(set(violations))[:10]:
            fig.fail(f"invariant: {v}")
        for agent_id, tasks in created.items():
            fig.check(len(tasks) == 1, f"agent {agent_id}: {len(tasks)} tasks created {tasks}")
        latest = harness.result(agent_ids)
        for item in latest:
            fig.check(
                item.get("status") in ("In queue", "Updating"),
                f"agent {item['agent']} ended {item.get('status')}",
            )
        if latencies:
            q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies
            fig.notes.append(
                f"{clients} clients x {per_client} requests in {elapsed:.1f} s "
                f"({len(latencies) / elapsed:.0f}/s); latency p50 "
                f"{statistics.median(latencies) * 1000:.0f} ms, "
                f"p99 {q[-1] * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms"
            )


class BlackHole:
    """A TCP server that accepts connections and never answers."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.close()


def fast_client(harness: ManagerHarness, fig: Figure, seconds: float, what: str) -> list[float]:
    """Plain queries on both sockets for ``seconds``: each must answer within ``FAST``."""
    latencies = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for path in (harness.config.upgrade_socket, harness.config.task_socket):
            started = time.monotonic()
            try:
                reply = send_json(
                    path,
                    {
                        "origin": {"module": "api", "name": "node01"},
                        "command": "upgrade_result",
                        "parameters": {"agents": [1]},
                    },
                    timeout=60,
                )
                took = time.monotonic() - started
                latencies.append(took)
                fig.check(
                    is_envelope(reply) and took < FAST,
                    f"{what}: a plain query took {took:.2f} s ({reply!r})"[:300],
                )
            except (OSError, ValueError) as exc:
                fig.fail(f"{what}: a plain query was not answered: {exc}")
        time.sleep(0.1)
    return latencies


def slow_repository(fig: Figure, size: Size) -> None:
    hole = BlackHole()
    root = scratch("r6-slow")
    config = manager_config(root / "manager", sources={"http": {"timeout": 3, "retries": 1}})
    slow_n = size.pick(12, 40)
    try:
        with ManagerHarness(config) as harness:
            for agent_id in range(1, slow_n + 1):
                harness.store.upsert_agent(
                    AgentInfo(
                        agent_id=agent_id,
                        name="s",
                        version="v4.8.0",
                        connection_status="active",
                        node="node01",
                        **PLATFORM,
                    )
                )

            def slow(agent_id: int) -> None:
                with contextlib.suppress(OSError, ValueError):
                    send_json(
                        harness.config.upgrade_socket,
                        {
                            "command": "upgrade",
                            "parameters": {
                                "agents": [agent_id],
                                "wpk_repo": f"http://127.0.0.1:{hole.port}/",
                            },
                        },
                        timeout=120,
                    )

            threads = [
                threading.Thread(target=slow, args=(a,), daemon=True) for a in range(1, slow_n + 1)
            ]
            for t in threads:
                t.start()
            time.sleep(0.5)
            lat = fast_client(harness, fig, size.pick(4, 15), "beside slow repositories")
            fig.notes.append(
                f"{slow_n} requests naming a black-holed repository; plain queries meanwhile: "
                f"max {max(lat) * 1000:.0f} ms over {len(lat)}"
            )
            hole.close()  # the waiting lookups now fail at once
            for t in threads:
                t.join(60)
    finally:
        hole.close()


def expensive_request(fig: Figure, size: Size) -> None:
    root = scratch("r6-big")
    with ManagerHarness(manager_config(root / "manager")) as harness:
        agents = list(range(1, size.pick(2000, 9000)))
        message = json.dumps(
            {"command": "upgrade_update_status", "parameters": {"agents": agents, "status": "Done"}}
        ).encode()
        done = threading.Event()

        def big() -> None:
            try:
                send_json(harness.config.upgrade_socket, json.loads(message), timeout=300)
            finally:
                done.set()

        started = time.monotonic()
        threading.Thread(target=big, daemon=True).start()
        time.sleep(0.3)
        lat = fast_client(harness, fig, size.pick(2, 10), "beside a report naming many agents")
        done.wait(300)
        fig.notes.append(
            f"a report naming {len(agents)} agents took {time.monotonic() - started:.1f} s; "
            f"plain queries meanwhile: max {max(lat) * 1000:.0f} ms over {len(lat)}"
        )


def measure(size: Size) -> list[Figure]:
    fig = Figure("R6", "load")
    concurrent_requests(fig, size)
    slow_repository(fig, size)
    expensive_request(fig, size)
    return [fig]
