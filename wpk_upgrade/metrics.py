"""Prometheus metrics of a manager node (prometheus-client and aiohttp, extra ``api``).

``MetricsPlugin`` is a pluggy hook plugin registered on the manager's plugin manager when
``[metrics] enabled = true``; ``start_metrics`` serves ``GET /metrics`` on ``[metrics] listen``
(no authentication: bind it to a private address). Each manager has its own registry.

From the lifecycle hooks (exact, this node's work since it started):

* ``wpk_upgrade_bytes_sent_total``: WPK bytes delivered to agents (``wpk_transfer_progress``);
* ``wpk_upgrade_transfer_duration_seconds``: from Updating to the WPK's last byte;
* ``wpk_upgrade_install_duration_seconds{outcome}``: from the last byte to the outcome
  (``Updated`` or ``Error``: the SHA1 check, the installer, the agent's restart and report);
* ``wpk_upgrade_task_duration_seconds{status}`` and ``wpk_upgrade_tasks_finished_total{status}``:
  creation to a final status, per final status.

Read at scrape time (the store part at most once per ``refresh_interval`` seconds):

* ``wpk_upgrade_tasks{status}``: tasks in the store by status (every node of a shared store);
* ``wpk_upgrade_agents{connection_status}``: known agents by connection status;
* ``wpk_upgrade_queue_depth``, ``wpk_upgrade_running_tasks``: this node's dispatcher;
* ``wpk_upgrade_active_agents``: agents connected to this node.

Status labels are the words ``upgrade_result`` shows (``In queue``, ``Updating``, ...).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import PluginError
from .hookspecs import hookimpl
from .models import Task, TaskStatus

try:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
    )
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise PluginError(
        "the metrics endpoint needs prometheus-client: pip install 'wpk-upgrade[api]'"
    ) from exc

from . import __version__

if TYPE_CHECKING:
    from .api import WebServer
    from .daemon import Manager

BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf"))
PLUGIN_NAME = "metrics"


class MetricsPlugin:
    """Collects a node's metrics from the lifecycle hooks and, on scrape, from the store."""

    def __init__(
        self,
        manager: Manager | None = None,
        refresh_interval: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.manager = manager
        self.refresh_interval = refresh_interval
        self.clock = clock
        self.registry = CollectorRegistry()
        r = self.registry
        self.tasks = Gauge(
            "wpk_upgrade_tasks", "Tasks in the store by status", ["status"], registry=r
        )
        self.agents = Gauge(
            "wpk_upgrade_agents",
            "Known agents by connection status",
            ["connection_status"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "wpk_upgrade_queue_depth", "Tasks of this node waiting for a free slot", registry=r
        )
        self.running = Gauge(
            "wpk_upgrade_running_tasks", "Tasks this node is pushing to agents", registry=r
        )
        self.active_agents = Gauge(
            "wpk_upgrade_active_agents", "Agents connected to this node", registry=r
        )
        self.bytes_sent = Counter(
            "wpk_upgrade_bytes_sent", "WPK bytes delivered to agents", registry=r
        )
        self.transfer = Histogram(
            "wpk_upgrade_transfer_duration_seconds",
            "From Updating to the WPK's last byte delivered",
            buckets=BUCKETS,
            registry=r,
        )
        self.install = Histogram(
            "wpk_upgrade_install_duration_seconds",
            "From the WPK's last byte to the task's outcome",
            ["outcome"],
            buckets=BUCKETS,
            registry=r,
        )
        self.task_duration = Histogram(
            "wpk_upgrade_task_duration_seconds",
            "From a task's creation to its final status",
            ["status"],
            buckets=BUCKETS,
            registry=r,
        )
        self.finished = Counter(
            "wpk_upgrade_tasks_finished",
            "Tasks that reached a final status",
            ["status"],
            registry=r,
        )
        info = Gauge("wpk_upgrade_node_info", "This manager node", ["node", "version"], registry=r)
        node = manager.config.node_name if manager is not None else ""
        info.labels(node=node, version=__version__).set(1)
        for status in TaskStatus:
            self.tasks.labels(status=status.display).set(0)
        self._lock = threading.Lock()
        self._started: dict[int, float] = {}
        self._delivered: dict[int, float] = {}
        self._sent: dict[int, int] = {}
        self._refreshed: float | None = None

    # ---------------------------------------------------------------- hooks

    @hookimpl
    def wpk_after_task_status_changed(
        self,
        task: Task,
        old_status: TaskStatus | None,
        new_status: TaskStatus,
        reason: str | None,
    ) -> None:
        now = self.clock()
        with self._lock:
            if new_status is TaskStatus.IN_PROGRESS:
                self._started[task.task_id] = now
                self._sent[task.task_id] = 0
                return
            if not new_status.final:
                return
            self.finished.labels(status=new_status.display).inc()
            self.task_duration.labels(status=new_status.display).observe(
                max(0.0, time.time() - task.create_time)
            )
            delivered = self._delivered.pop(task.task_id, None)
            if delivered is not None and new_status in (TaskStatus.DONE, TaskStatus.FAILED):
                self.install.labels(outcome=new_status.display).observe(now - delivered)
            self._started.pop(task.task_id, None)
            self._sent.pop(task.task_id, None)

    @hookimpl
    def wpk_transfer_progress(self, task_id: int, agent_id: int, sent: int, total: int) -> None:
        now = self.clock()
        with self._lock:
            before = self._sent.get(task_id, 0)
            delta = sent - before if sent >= before else sent  # a restarted transfer
            if delta > 0:
                self.bytes_sent.inc(delta)
            self._sent[task_id] = sent
            if total and sent >= total and task_id not in self._delivered:
                self._delivered[task_id] = now
                started = self._started.get(task_id)
                if started is not None:
                    self.transfer.observe(now - started)

    # ---------------------------------------------------------------- scrape

    def _store_counts(self) -> tuple[dict[TaskStatus, int], dict[str, int]]:
        assert self.manager is not None
        store = self.manager.store
        tasks = {s: len(store.tasks_in_status(None, s)) for s in TaskStatus}
        agents: dict[str, int] = {}
        for agent in store.list_agents():
            agents[agent.connection_status] = agents.get(agent.connection_status, 0) + 1
        return tasks, agents

    async def refresh(self) -> None:
        """Update the scrape-time gauges (the store part at most every refresh_interval)."""
        manager = self.manager
        if manager is None:
            return
        self.queue_depth.set(manager.dispatcher.queue.qsize())
        self.running.set(len(manager.dispatcher.running))
        self.active_agents.set(len(manager.hub.connected))
        now = self.clock()
        if self._refreshed is not None and now - self._refreshed < self.refresh_interval:
            return
        tasks, agents = await asyncio.to_thread(self._store_counts)
        self._refreshed = now
        for status, count in tasks.items():
            self.tasks.labels(status=status.display).set(count)
        self.agents.clear()
        for connection, count in agents.items():
            self.agents.labels(connection_status=connection).set(count)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


async def start_metrics(manager: Manager) -> WebServer:
    """Register the plugin on the manager and serve ``GET /metrics`` on ``[metrics] listen``."""
    from aiohttp import web

    from .api import serve_app

    plugin = MetricsPlugin(manager, float(manager.config.metrics.refresh_interval))
    manager.pm.register(plugin, name=PLUGIN_NAME)

    async def metrics(request: web.Request) -> web.Response:
        await plugin.refresh()
        return web.Response(body=plugin.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)

    def unregister() -> None:
        if manager.pm.is_registered(plugin):
            manager.pm.unregister(plugin)

    try:
        return await serve_app(app, manager.config.metrics.listen, "metrics", on_close=unregister)
    except BaseException:
        unregister()
        raise


__all__ = ["MetricsPlugin", "start_metrics"]
