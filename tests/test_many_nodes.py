"""Several manager nodes sharing one PostgreSQL (and MariaDB) task store.

Three ``ManagerHarness`` nodes (node01..node03), each with its own simulated agents on the
real transport, one database:

* a task belongs to the node its agent is connected to: a request sent to any node for
  agents of every node is pushed by each agent's own node (claimed from the store,
  ``claim_pending`` with ``FOR UPDATE SKIP LOCKED``); every task is dispatched exactly once
  (one Pending -> In progress in its history, by its node) and all end Updated;
* the task socket answers the same on every node;
* many clients at once, on the upgrade sockets of several nodes, asking for the same agents:
  exactly one active task per agent, and every other answer is "already upgrading".
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_cases_async import Lab, Sim, agent_info, build_lab, commands, node_overrides

from wpk_upgrade.interfaces import TaskFilter
from wpk_upgrade.models import Task, TaskStatus
from wpk_upgrade.testing import databases
from wpk_upgrade.testing.harness import ManagerHarness, ScriptedAgent, manager_config

NODES = ("node01", "node02", "node03")
PER_NODE = 10
ROUNDS = 3
ALREADY = "Upgrade procedure could not start. Agent already upgrading"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    return build_lab(tmp_path_factory.mktemp("lab"))


@pytest.fixture(scope="module", params=[databases.POSTGRESQL, databases.MYSQL])
def server_url(request: pytest.FixtureRequest) -> Iterator[str]:
    server = databases.server_or_skip(request.param)
    with databases.temporary_database(server, prefix="wpk_nodes") as url:
        yield url


@contextlib.contextmanager
def cluster(tmp: Path, lab: Lab, url: str, **overrides: Any) -> Iterator[list[ManagerHarness]]:
    """Three nodes on one store (emptied first), stopped on exit."""
    databases.truncate_tables(url)
    with contextlib.ExitStack() as stack:
        nodes = []
        for name in NODES:
            data = node_overrides(lab, lab.repo.as_uri() + "/", **overrides)
            data.update(node_name=name, store={"url": url})
            data["task_manager"] = {"poll_interval": 0.2, **data.get("task_manager", {})}
            nodes.append(stack.enter_context(ManagerHarness(manager_config(tmp / name, **data))))
        yield nodes


@contextlib.contextmanager
def fleet(nodes: list[ManagerHarness], per_node: int) -> Iterator[dict[int, ScriptedAgent]]:
    """``per_node`` simulated agents connected to each node: node i has ids i*100+1..."""
    with contextlib.ExitStack() as stack:
        agents: dict[int, ScriptedAgent] = {}
        for i, h in enumerate(nodes, start=1):
            for k in range(1, per_node + 1):
                agent_id = i * 100 + k
                agents[agent_id] = stack.enter_context(
                    ScriptedAgent(h, agent_info(agent_id), Sim())
                )
        # the store knows each agent as active on its node before any request
        nodes[0].wait_for(
            lambda: (
                all(
                    a.connection_status == "active"
                    for a in nodes[0].store.get_agents(list(agents)).values()
                )
                and len(nodes[0].store.get_agents(list(agents))) == len(agents)
            ),
            15,
        )
        yield agents


def _of_agent(tasks: list[Task], agent_id: int) -> list[Task]:
    return sorted((t for t in tasks if t.agent_id == agent_id), key=lambda t: t.task_id)


def node_of(agent_id: int) -> str:
    return NODES[agent_id // 100 - 1]


def test_three_nodes_each_push_their_own_agents(tmp_path: Path, lab: Lab, server_url: str) -> None:
    """Three rounds over 30 agents (90 tasks): each round every node gets one request for a
    third of the cluster's agents, most of them connected to other nodes."""
    with cluster(tmp_path, lab, server_url) as nodes, fleet(nodes, PER_NODE) as agents:
        ids = sorted(agents)
        asked_on: dict[tuple[int, int], str] = {}  # (agent, round) -> node asked
        for rnd in range(ROUNDS):
            for i, h in enumerate(nodes):
                wanted = [a for a in ids if (a + rnd) % len(nodes) == i]
                asked_on.update({(a, rnd): NODES[i] for a in wanted})
                reply = h.upgrade({"command": "upgrade", "parameters": {"agents": wanted}})
                assert [item["error"] for item in reply["data"]] == [0] * len(wanted), reply
            for agent in agents.values():
                nodes[0].wait_for(lambda a=agent, n=rnd + 1: commands(a).count("upgrade") >= n)
            for agent in agents.values():
                reply = agent.report({"error": 0, "message": "ok", "status": "Done"})
                assert reply["data"][0]["error"] == 0, reply
            items = nodes[rnd % len(nodes)].wait_final(ids, timeout=30)
            assert [i["status"] for i in items] == ["Updated"] * len(ids)
        # every task dispatched exactly once, by the node its agent is connected to
        store = nodes[0].store
        tasks = store.list_tasks(TaskFilter(limit=0))
        assert Counter(t.agent_id for t in tasks) == Counter({a: ROUNDS for a in ids})
        rounds = {t.task_id: r for a in ids for r, t in enumerate(_of_agent(tasks, a))}
        for task in tasks:
            assert task.node == node_of(task.agent_id)
            assert task.status is TaskStatus.DONE
            moves = [
                c
                for c in store.history(task.task_id)
                if c.from_status is TaskStatus.PENDING and c.to_status is TaskStatus.IN_PROGRESS
            ]
            assert len(moves) == 1 and moves[0].node == task.node, store.history(task.task_id)
            # asked on another node: claimed by its own node from the store
            if asked_on[task.agent_id, rounds[task.task_id]] != task.node:
                assert moves[0].reason == "claimed"
        for agent in agents.values():
            assert commands(agent).count("lock_restart") == ROUNDS
        # the task socket answers the same on every node
        answers = [h.result(ids) for h in nodes]
        assert answers[0] == answers[1] == answers[2]


def test_same_agents_asked_by_many_clients_on_several_nodes(
    tmp_path: Path, lab: Lab, server_url: str
) -> None:
    """12 clients at once (4 per node), each asking for every agent of the cluster in its
    own order: exactly one task per agent, all other answers code 10."""
    opts = {"upgrade": {"max_threads": 2}}
    with cluster(tmp_path, lab, server_url, **opts) as nodes, fleet(nodes, 4) as agents:
        ids = sorted(agents)
        clients = [(nodes[i % len(nodes)], ids[i:] + ids[:i]) for i in range(12)]
        barrier = threading.Barrier(len(clients))
        replies: list[dict[str, Any]] = [{}] * len(clients)

        def client(k: int) -> None:
            h, order = clients[k]
            barrier.wait(10)
            replies[k] = h.upgrade({"command": "upgrade", "parameters": {"agents": order}})

        threads = [threading.Thread(target=client, args=(k,)) for k in range(len(clients))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        successes: Counter[int] = Counter()
        for reply in replies:
            assert reply["error"] == 0, reply
            for item in reply["data"]:
                if item["error"] == 0:
                    successes[item["agent"]] += 1
                else:
                    assert (item["error"], item["message"]) == (10, ALREADY), item
        assert successes == Counter({a: 1 for a in ids})
        store = nodes[0].store
        tasks = store.list_tasks(TaskFilter(limit=0))
        assert sorted(t.agent_id for t in tasks) == ids
        assert all(t.node == node_of(t.agent_id) for t in tasks)
        for agent in agents.values():
            nodes[0].wait_for(lambda a=agent: commands(a).count("upgrade") >= 1, 30)
        statuses = [i["status"] for i in nodes[0].result(ids)]
        assert statuses == ["Updating"] * len(ids)
        for agent in agents.values():
            assert commands(agent).count("lock_restart") == 1
