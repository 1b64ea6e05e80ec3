"""Prometheus metrics (``metrics.py``): the endpoint of a real manager after real upgrades, and
the hook plugin's arithmetic with a fake clock."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from wpk_upgrade import pki, wpk
from wpk_upgrade.metrics import PLUGIN_NAME, MetricsPlugin
from wpk_upgrade.models import AgentInfo, Task, TaskStatus
from wpk_upgrade.testing.harness import ManagerHarness, ScriptedAgent, json_agent

DONE = {"error": 0, "message": "Upgrade was successful", "status": "Done"}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def agent(agent_id: int) -> AgentInfo:
    return AgentInfo(
        agent_id=agent_id,
        version="Wazuh v4.8.0",
        os_platform="ubuntu",
        os_major="22",
        os_minor="04",
        os_arch="x86_64",
    )


@pytest.fixture(scope="module")
def signed_wpk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real signed WPK (lab CA, code-signing certificate, installer and a 32 KiB payload)."""
    root = tmp_path_factory.mktemp("wpk")
    ca = pki.create_ca(root / "ca")
    signer = pki.issue_certificate(ca.cert, ca.key, root / "signer", "signer", "code")
    (root / "upgrade.sh").write_text("#!/bin/sh\nexit 0\n")
    (root / "package.bin").write_bytes(os.urandom(32 * 1024))
    out = root / "wazuh_agent_v4.9.1_linux_amd64.deb.wpk"
    wpk.pack(out, signer.cert, signer.key, [root / "upgrade.sh", root / "package.bin"])
    return out


def test_the_endpoint_shows_finished_upgrades(
    make_harness: Callable[..., ManagerHarness], signed_wpk: Path
) -> None:
    h = make_harness(
        metrics={"enabled": True, "listen": "127.0.0.1:0"}, upgrade={"chunk_size": 4096}
    )
    assert h.manager is not None
    (server,) = h.manager.web
    url = f"http://127.0.0.1:{server.port}/metrics"
    size = signed_wpk.stat().st_size
    with (
        ScriptedAgent(h, agent(5), json_agent()) as ok,
        ScriptedAgent(h, agent(6), json_agent(fail_at="sha1")),
    ):
        reply = h.upgrade(
            {
                "command": "upgrade_custom",
                "parameters": {"agents": [5, 6], "file_path": str(signed_wpk)},
            }
        )
        assert [i["error"] for i in reply["data"]] == [0, 0]
        h.wait_for(lambda: any('"upgrade"' in p for _, p in list(ok.received)))
        h.wait_for(lambda: h.result([6])[0]["status"] == "Error")
        ok.report(DONE)
        h.wait_final([5, 6])
        samples = scrape(url)
        assert value(samples, "wpk_upgrade_active_agents") == 2
    assert value(samples, "wpk_upgrade_tasks", status="Updated") == 1
    assert value(samples, "wpk_upgrade_tasks", status="Error") == 1
    assert value(samples, "wpk_upgrade_tasks", status="In queue") == 0
    assert value(samples, "wpk_upgrade_agents", connection_status="active") == 2
    assert value(samples, "wpk_upgrade_queue_depth") == 0
    assert value(samples, "wpk_upgrade_running_tasks") == 0
    # Both agents received the whole WPK (agent 6 failed at sha1, after the last write).
    assert value(samples, "wpk_upgrade_bytes_sent_total") == 2 * size
    assert value(samples, "wpk_upgrade_transfer_duration_seconds_count") == 2
    assert value(samples, "wpk_upgrade_install_duration_seconds_count", outcome="Updated") == 1
    # Agent 6 failed after its transfer (the sha1 check): counted as an Error outcome.
    assert value(samples, "wpk_upgrade_install_duration_seconds_count", outcome="Error") == 1
    assert value(samples, "wpk_upgrade_tasks_finished_total", status="Updated") == 1
    assert value(samples, "wpk_upgrade_tasks_finished_total", status="Error") == 1
    assert value(samples, "wpk_upgrade_task_duration_seconds_count", status="Updated") == 1
    assert value(samples, "wpk_upgrade_node_info", node="node01", version="0.1.0") == 1


def test_metrics_are_off_unless_enabled(harness: ManagerHarness) -> None:
    assert harness.manager is not None
    assert harness.manager.web == []
    assert not harness.manager.pm.has_plugin(PLUGIN_NAME)


def task(task_id: int, status: TaskStatus, created: int = 0) -> Task:
    return Task(task_id, 5, "node01", "upgrade_module", "upgrade", status, create_time=created)


def test_plugin_counts_bytes_and_durations_from_the_hooks() -> None:
    clock = [100.0]
    plugin = MetricsPlugin(clock=lambda: clock[0])

    def moved(t: Task, old: TaskStatus | None, new: TaskStatus) -> None:
        plugin.wpk_after_task_status_changed(task=t, old_status=old, new_status=new, reason=None)

    def sample(name: str, **labels: str) -> float | None:
        return plugin.registry.get_sample_value(name, labels)

    moved(task(1, TaskStatus.PENDING), None, TaskStatus.PENDING)
    moved(task(1, TaskStatus.IN_PROGRESS), TaskStatus.PENDING, TaskStatus.IN_PROGRESS)
    plugin.wpk_transfer_progress(task_id=1, agent_id=5, sent=400, total=1000)
    plugin.wpk_transfer_progress(task_id=1, agent_id=5, sent=100, total=1000)  # restarted
    clock[0] = 103.0
    plugin.wpk_transfer_progress(task_id=1, agent_id=5, sent=1000, total=1000)
    assert sample("wpk_upgrade_bytes_sent_total") == 400 + 100 + 900
    assert sample("wpk_upgrade_transfer_duration_seconds_sum") == 3.0
    clock[0] = 110.0
    moved(task(1, TaskStatus.FAILED), TaskStatus.IN_PROGRESS, TaskStatus.FAILED)
    assert sample("wpk_upgrade_install_duration_seconds_sum", outcome="Error") == 7.0
    assert sample("wpk_upgrade_tasks_finished_total", status="Error") == 1
    # A task cancelled while queued: finished, no transfer or install observed.
    moved(task(2, TaskStatus.CANCELLED), TaskStatus.PENDING, TaskStatus.CANCELLED)
    assert sample("wpk_upgrade_tasks_finished_total", status="Cancelled") == 1
    assert sample("wpk_upgrade_transfer_duration_seconds_count") == 1
    assert plugin._started == {} and plugin._delivered == {} and plugin._sent == {}
