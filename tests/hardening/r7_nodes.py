"""R7: three manager processes on one PostgreSQL task store, under load.

Simulated agents are spread over the three nodes; clients send ``upgrade_custom`` requests to
random nodes (each request names its own WPK file, so the agents' install counts are per task)
and, in every round, the same agent is requested from all three nodes at once. Checks:

* no task dispatched twice: every task's history holds one ``In queue -> Updating`` step, and
  its agent ran its installer once;
* the same agent requested on three nodes at once: one task, the other two answered 10;
* every task ends Updated (or Error with a reason) on the node its agent is connected to, with a
  consistent history (same rules as R2).

Skipped (with the reason in the figure) when no PostgreSQL server is installed.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from typing import Any

from hardlib import Figure, ManagerProc, Size, free_port, scratch, send_json
from r2_crash import history_problems, manager_toml
from simagents import Fleet

from wpk_upgrade.interfaces import TaskFilter
from wpk_upgrade.models import TaskStatus
from wpk_upgrade.testing import databases

NODES = ("node01", "node02", "node03")


def measure(size: Size) -> list[Figure]:
    fig = Figure("R7", "three nodes on one PostgreSQL")
    try:
        server = databases.find_server(databases.POSTGRESQL)
    except databases.ServerNotInstalled as exc:
        fig.notes.append(f"not measured: {exc}")
        return [fig]
    upgrades = size.pick(30, 300)
    agent_ids = list(range(301, 301 + size.pick(6, 30)))
    root = scratch("r7")
    packages = root / "packages"
    packages.mkdir()
    rng = random.Random(7)
    with databases.temporary_database(server, "wpk_hardening") as url:
        ports = {node: free_port() for node in NODES}
        managers = {
            node: ManagerProc(root / node, manager_toml(root / node, ports[node], node, url))
            for node in NODES
        }
        for manager in managers.values():
            manager.start(60)
        home_of = {a: NODES[i % 3] for i, a in enumerate(agent_ids)}
        acked: dict[int, tuple[int, str]] = {}
        lock = threading.Lock()
        counter = iter(range(10**9))
        try:
            with Fleet({a: f"127.0.0.1:{ports[home_of[a]]}" for a in agent_ids}) as fleet:
                time.sleep(2)  # agents connected and recorded on their nodes

                def request(node: str, agent: int) -> dict[str, Any] | None:
                    name = f"pkg-{next(counter):05d}.wpk"
                    path = packages / name
                    path.write_bytes(rng.randbytes(200_000))
                    try:
                        reply = send_json(
                            managers[node].upgrade_socket,
                            {
                                "origin": {"module": "api"},
                                "command": "upgrade_custom",
                                "parameters": {"agents": [agent], "file_path": str(path)},
                            },
                            timeout=30,
                        )
                    except (OSError, ValueError) as exc:
                        fig.fail(f"node {node}: request for agent {agent} not answered: {exc}")
                        return None
                    item: dict[str, Any] = reply["data"][0]
                    if item.get("error") == 0:
                        with lock:
                            acked[item["task_id"]] = (agent, name)
                    return item

                def idle(agent: int) -> bool:
                    reply = send_json(
                        managers[rng.choice(NODES)].task_socket,
                        {
                            "origin": {"module": "api"},
                            "command": "upgrade_result",
                            "parameters": {"agents": [agent]},
                        },
                    )
                    return reply["data"][0].get("status") not in ("In queue", "Updating")

                deadline = time.monotonic() + size.pick(120, 900)
                race_rounds = 0
                while len(acked) < upgrades and time.monotonic() < deadline:
                    free = [a for a in agent_ids if idle(a)]
                    if not free:
                        time.sleep(0.2)
                        continue
                    # the same agent from three nodes at once
                    target = free.pop(0)
                    items: list[dict[str, Any] | None] = []
                    threads = [
                        threading.Thread(
                            target=lambda n=n, got=items, a=target: got.append(request(n, a))
                        )
                        for n in NODES
                    ]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join(60)
                    race_rounds += 1
                    codes = sorted(i.get("error", -1) for i in items if i is not None)
                    fig.check(
                        codes == [0, 10, 10],
                        f"agent {target} requested on 3 nodes at once: item codes {codes}",
                    )
                    # the others from random nodes, concurrently
                    threads = [
                        threading.Thread(target=request, args=(rng.choice(NODES), a))
                        for a in free[: upgrades - len(acked)]
                    ]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join(60)
                end = time.monotonic() + 60
                while time.monotonic() < end and not all(idle(a) for a in agent_ids):
                    time.sleep(0.5)
                installs = fleet.installs()
        finally:
            for manager in managers.values():
                manager.stop()
        from wpk_upgrade.config import load_manager_config
        from wpk_upgrade.daemon import open_store

        store = open_store(load_manager_config(root / "node01" / "manager.toml"))
        store.open()
        try:
            tasks = store.list_tasks(TaskFilter(limit=100000))
            by_id = {t.task_id: t for t in tasks}
            for task_id, (agent, name) in sorted(acked.items()):
                task = by_id.get(task_id)
                if task is None:
                    fig.fail(f"task {task_id} (agent {agent}) lost")
                    continue
                rows = store.history(task_id)
                dispatches = [
                    r
                    for r in rows
                    if r.from_status is TaskStatus.PENDING and r.to_status is TaskStatus.IN_PROGRESS
                ]
                runs = installs.get(f"{agent}:{name}", 0)
                fig.check(
                    len(dispatches) == 1 and runs == 1,
                    f"task {task_id} (agent {agent}): dispatched {len(dispatches)} times "
                    f"({[r.node for r in dispatches]}), installer run {runs} times",
                )
                fig.check(
                    task.status is TaskStatus.DONE
                    or (task.status is TaskStatus.FAILED and bool(task.error_msg)),
                    f"task {task_id} (agent {agent}) ended {task.status}: {task.error_msg}",
                )
                fig.check(
                    task.node == home_of[agent],
                    f"task {task_id}: run by {task.node}, agent {agent} is on {home_of[agent]}",
                )
                for problem in history_problems(store, task):
                    fig.fail(problem)
            by_node: dict[str, int] = {}
            for task in tasks:
                by_node[task.node] = by_node.get(task.node, 0) + 1
            fig.notes.append(
                f"{len(acked)} tasks over {len(agent_ids)} agents on 3 nodes ({by_node}); "
                f"{race_rounds} rounds of one agent requested on all 3 nodes at once"
            )
        finally:
            with contextlib.suppress(Exception):
                store.close()
    return [fig]
