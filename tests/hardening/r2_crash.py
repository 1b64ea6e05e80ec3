"""R2: crash safety. ``kill -9`` of a real manager process at random moments while it runs
upgrades (simulated agents on the real transport), each time started again at once; then a
last kill and restart, and the store is checked:

* no task lost: every task a client was given (``task_id`` in a reply) exists;
* none stuck: after the run every task is final, or active for less than its timeout;
* every history consistent: it starts with the creation, each step follows the one before and
  is a transition of ``models.TRANSITIONS`` (or a same-status note), and ends on the task's
  status;
* no installer run twice for one task (each request carries its own WPK file name, so the
  agents' counts per file are per task), and at most one active task per agent.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import time
from pathlib import Path

from hardlib import Figure, ManagerProc, Size, free_port, scratch, send_json
from simagents import Fleet

from wpk_upgrade.config import load_manager_config
from wpk_upgrade.daemon import open_store
from wpk_upgrade.interfaces import TaskFilter, TaskStore
from wpk_upgrade.models import TRANSITIONS, Task, TaskStatus

TASK_TIMEOUT = 30


def manager_toml(home: Path, port: int, node: str = "node01", store_url: str | None = None) -> str:
    store = f'[store]\nurl = "{store_url}"\n' if store_url else ""
    return (
        f'home = "{home}"\nnode_name = "{node}"\n'
        "[upgrade]\nmax_threads = 8\ncommand_timeout = 10\nopen_attempts = 5\n"
        "open_retry_delay = 0.3\nresume_timeout = 10\n"
        f"[task_manager]\ntask_timeout = {TASK_TIMEOUT}\nsweep_interval = 1\n"
        'on_restart = "resume"\npoll_interval = 0.5\n'
        f'[transport]\nname = "tcp"\noptions = {{ listen = "127.0.0.1:{port}", heartbeat = 2.0 }}\n'
        + store
    )


def history_problems(store: TaskStore, task: Task) -> list[str]:
    """What is wrong with a task's history (empty when consistent)."""
    rows = store.history(task.task_id)
    if not rows:
        return [f"task {task.task_id}: no history"]
    problems = []
    if rows[0].from_status is not None or rows[0].to_status is not TaskStatus.PENDING:
        problems.append(
            f"task {task.task_id}: history starts {rows[0].from_status} -> {rows[0].to_status}"
        )
    for prev, row in itertools.pairwise(rows):
        if row.from_status is not prev.to_status:
            problems.append(
                f"task {task.task_id}: {prev.to_status} then a step from {row.from_status}"
            )
        elif (
            row.from_status is not row.to_status
            and (row.from_status, row.to_status) not in TRANSITIONS
        ):
            problems.append(
                f"task {task.task_id}: {row.from_status} -> {row.to_status} not allowed"
            )
    if rows[-1].to_status is not task.status:
        problems.append(
            f"task {task.task_id}: history ends {rows[-1].to_status}, task is {task.status}"
        )
    return problems


def check_store(
    fig: Figure, store: TaskStore, acked: dict[int, tuple[int, str]], fleet: Fleet, now: float
) -> list[Task]:
    tasks = store.list_tasks(TaskFilter(limit=100000))
    by_id = {t.task_id: t for t in tasks}
    for task_id, (agent, name) in sorted(acked.items()):
        fig.check(task_id in by_id, f"task {task_id} (agent {agent}, {name}) was LOST")
    for task in tasks:
        since = task.update_time or task.create_time
        stuck = task.status.active and now - since > TASK_TIMEOUT + 5
        fig.check(not stuck, f"task {task.task_id} stuck {task.status} since {now - since:.0f} s")
        problems = history_problems(store, task)
        for problem in problems:
            fig.fail(problem)
        if not problems:
            fig.ok()
    active: dict[int, int] = {}
    for task in tasks:
        if task.status.active:
            active[task.agent_id] = active.get(task.agent_id, 0) + 1
    for agent, count in active.items():
        fig.check(count <= 1, f"agent {agent}: {count} active tasks")
    for key, count in sorted(fleet.installs().items()):
        fig.check(count == 1, f"{key}: installer run {count} times")
    return tasks


def measure(size: Size) -> list[Figure]:
    fig = Figure("R2", "crash safety")
    upgrades = size.pick(20, 100)
    agent_ids = list(range(201, 201 + size.pick(4, 10)))
    root = scratch("r2")
    port = free_port()
    home = root / "manager"
    manager = ManagerProc(home, manager_toml(home, port)).start()
    packages = root / "packages"
    packages.mkdir()
    rng = random.Random(2)
    acked: dict[int, tuple[int, str]] = {}
    kills = 0
    busy_at_kill: list[int] = []
    next_kill = time.monotonic() + rng.uniform(0.3, 1.5)
    sent = 0
    current: dict[int, int | None] = {a: None for a in agent_ids}  # agent -> active task id
    deadline = time.monotonic() + size.pick(150, 900)
    with Fleet({a: f"127.0.0.1:{port}" for a in agent_ids}) as fleet:
        try:
            while time.monotonic() < deadline:
                if time.monotonic() >= next_kill and sent < upgrades:
                    manager.kill9()
                    kills += 1
                    busy_at_kill.append(sum(1 for v in current.values() if v is not None))
                    time.sleep(rng.uniform(0, 0.3))
                    manager.start()
                    next_kill = time.monotonic() + rng.uniform(0.3, 1.5)
                with contextlib.suppress(OSError, ValueError):
                    results = send_json(
                        manager.task_socket,
                        {
                            "origin": {"module": "api"},
                            "command": "upgrade_result",
                            "parameters": {"agents": agent_ids},
                        },
                        timeout=10,
                    )
                    for item in results.get("data", []):
                        agent = item.get("agent")
                        if item.get("status") in ("In queue", "Updating"):
                            current[agent] = item.get("task_id")
                            acked.setdefault(item["task_id"], (agent, "(reply lost)"))
                        else:
                            current[agent] = None
                for agent in agent_ids:
                    if sent >= upgrades or current[agent] is not None:
                        continue
                    name = f"pkg-{sent:04d}.wpk"
                    path = packages / name
                    path.write_bytes(rng.randbytes(1_000_000))
                    try:
                        reply = send_json(
                            manager.upgrade_socket,
                            {
                                "origin": {"module": "api"},
                                "command": "upgrade_custom",
                                "parameters": {"agents": [agent], "file_path": str(path)},
                            },
                            timeout=10,
                        )
                    except (OSError, ValueError):
                        current[agent] = -1  # unknown: learn it from upgrade_result
                        sent += 1
                        continue
                    item = reply["data"][0]
                    if item.get("error") == 0:
                        acked[item["task_id"]] = (agent, name)
                        current[agent] = item["task_id"]
                        sent += 1
                if sent >= upgrades and all(v is None for v in current.values()):
                    break
                time.sleep(0.2)
            # the last crash and restart, then everything must end
            manager.kill9()
            kills += 1
            manager.start()
            end = time.monotonic() + TASK_TIMEOUT + 20
            while time.monotonic() < end:
                with contextlib.suppress(OSError, ValueError):
                    results = send_json(
                        manager.task_socket,
                        {
                            "origin": {"module": "api"},
                            "command": "upgrade_result",
                            "parameters": {"agents": agent_ids},
                        },
                        timeout=10,
                    )
                    if all(
                        i.get("status") not in ("In queue", "Updating") for i in results["data"]
                    ):
                        break
                time.sleep(0.5)
        finally:
            manager.stop()
        config = load_manager_config(home / "manager.toml")
        store = open_store(config)
        store.open()
        try:
            tasks = check_store(fig, store, acked, fleet, time.time())
        finally:
            store.close()
    statuses: dict[str, int] = {}
    for task in tasks:
        statuses[task.status.display] = statuses.get(task.status.display, 0) + 1
    fig.notes.append(
        f"{sent} upgrade requests, {len(acked)} tasks acknowledged, {len(tasks)} in the store, "
        f"{kills} kill -9 of the manager (tasks active at each: {busy_at_kill} and the last); "
        f"final statuses {statuses}"
    )
    errors = [t for t in tasks if t.status is TaskStatus.FAILED]
    for t in errors[:5]:
        fig.notes.append(f"task {t.task_id} Error: {t.error_msg}")
    return [fig]
