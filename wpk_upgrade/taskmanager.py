"""The task manager: the task socket's commands over a ``TaskStore``, plus the timeout sweep.

Reference §2.3 (commands, fields, codes), §8 (statuses, transitions, timeout, cleanup) and
decisions D2, D7, D10. The upgrade service calls the same typed methods in-process; the task
socket (``queue/tasks/task``) reaches them through ``handle``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pluggy

from .config import TaskManagerSection
from .errors import TaskCode, TaskError, task_message
from .interfaces import PHASE_INSTALLING, UPDATE_OK, TaskStore
from .models import (
    REQUESTABLE_STATUSES,
    Task,
    TaskParams,
    TaskStatus,
    now,
)
from .plugin_manager import notify
from .protocol import TaskRequest, envelope, task_error_reply

log = logging.getLogger(__name__)

T = TypeVar("T")

UPGRADE_MODULE = "upgrade_module"


@functools.lru_cache(maxsize=8192)
def reply_time(epoch: int | None) -> str:
    """``models.format_time`` (D2: UTC ``YYYY/MM/DD hh:mm:ss``, ``"0"`` when unset) from
    ``time.gmtime`` (several times faster than ``datetime``), cached: tasks of one request
    share their seconds; formatting was the slowest part of a 1,000-agent result."""
    if not epoch:
        return "0"
    return time.strftime("%Y/%m/%d %H:%M:%S", time.gmtime(epoch))


def result_item(agent_id: int, task: Task | None) -> dict[str, Any]:
    """One ``upgrade_result`` data item (mission text shape, D2 times, D10 statuses)."""
    if task is None:
        return {
            "error": int(TaskCode.NO_TASK),
            "message": task_message(TaskCode.NO_TASK),
            "agent": agent_id,
        }
    item: dict[str, Any] = {
        "error": 0,
        "message": "Success",
        "node": task.node,
        "module": task.module,
        "command": task.command,
        "agent": agent_id,
        "task_id": task.task_id,
        "create_time": reply_time(task.create_time),
        "update_time": reply_time(task.update_time),
        "status": task.status.display,
    }
    error_msg = task.error_msg or task.status.sentence
    if error_msg:
        item["error_msg"] = error_msg
    if task.bytes_total:
        item["progress"] = {"sent": task.bytes_sent, "total": task.bytes_total}
    return item


class TaskManager:
    """Typed task operations (async, store calls run in worker threads) and the socket handler."""

    def __init__(
        self,
        store: TaskStore,
        pm: pluggy.PluginManager,
        settings: TaskManagerSection,
        node: str,
    ) -> None:
        self.store = store
        self.pm = pm
        self.settings = settings
        self.node = node

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    # ------------------------------------------------------------------ typed operations

    async def create_if_idle(
        self, agents: Sequence[int], node: str, command: str, params: TaskParams
    ) -> tuple[list[Task], list[int]]:
        """Create tasks for agents with no active task; returns (created, busy agent ids)."""
        created, busy = await self._db(
            self.store.create_tasks_if_idle, list(agents), node, UPGRADE_MODULE, command, params
        )
        for task in created:
            notify(self.pm, "wpk_after_task_created", task=task, params=params)
            notify(
                self.pm,
                "wpk_after_task_status_changed",
                task=task,
                old_status=None,
                new_status=task.status,
                reason="created",
            )
        return created, busy

    async def claim(self, node: str, limit: int, skip_agents: Sequence[int] = ()) -> list[Task]:
        """Claim up to ``limit`` Pending tasks of ``node`` (atomic across nodes: each task is
        claimed once); they are In progress when returned. Fires the status hook."""
        claimed = await self._db(self.store.claim_pending, node, limit, None, skip_agents)
        for task in claimed:
            notify(
                self.pm,
                "wpk_after_task_status_changed",
                task=task,
                old_status=TaskStatus.PENDING,
                new_status=TaskStatus.IN_PROGRESS,
                reason="claimed",
            )
        return claimed

    async def set_status(
        self,
        task: Task,
        status: TaskStatus,
        node: str | None,
        error_msg: str | None = None,
        reason: str | None = None,
    ) -> bool:
        """Move one task (by id) if the transition table allows it; fires the hook."""
        moved = await self._db(
            self.store.set_task_status, task.task_id, node, status, error_msg, reason
        )
        if moved:
            await self._notify_change(task.task_id, task.status, status, reason)
        return moved

    async def update_latest(
        self,
        agent_id: int,
        node: str | None,
        status: TaskStatus,
        error_msg: str | None = None,
        reason: str | None = None,
    ) -> bool:
        """Move the agent's latest task; False when there is none or the move is refused."""
        before = (await self._db(self.store.latest_tasks, [agent_id])).get(agent_id)
        outcome = await self._db(
            self.store.update_status, agent_id, node, status, error_msg, reason
        )
        if outcome == UPDATE_OK and before is not None:
            await self._notify_change(before.task_id, before.status, status, reason)
            return True
        return outcome == UPDATE_OK

    async def update_latest_many(
        self,
        agents: Sequence[int],
        node: str | None,
        status: TaskStatus,
        error_msg: str | None = None,
        reason: str | None = None,
    ) -> set[int]:
        """``update_latest`` for every agent of a request (``TaskStore.update_status_many``:
        a request naming 10,000 agents took ~1 ms per agent one by one); the agents whose
        task moved. One status-change notification per moved task."""
        moved = await self._db(
            self.store.update_status_many, list(agents), node, status, error_msg, reason
        )
        after = await self._db(self.store.latest_tasks, list(moved)) if moved else {}
        for agent, before in moved.items():
            task = after.get(agent)
            if task is not None and task.task_id == before.task_id:
                notify(
                    self.pm,
                    "wpk_after_task_status_changed",
                    task=task,
                    old_status=before.status,
                    new_status=status,
                    reason=reason,
                )
        return set(moved)

    async def _notify_change(
        self, task_id: int, old: TaskStatus | None, new: TaskStatus, reason: str | None
    ) -> None:
        task = await self._db(self.store.get_task, task_id)
        if task is not None:
            notify(
                self.pm,
                "wpk_after_task_status_changed",
                task=task,
                old_status=old,
                new_status=new,
                reason=reason,
            )

    async def results(self, agents: Sequence[int]) -> list[dict[str, Any]]:
        """``upgrade_result`` items in request order."""
        latest = await self._db(self.store.latest_tasks, list(agents))
        return [result_item(a, latest.get(a)) for a in agents]

    async def cancel_agents(self, agents: Sequence[int]) -> list[dict[str, Any]]:
        """Extension: cancel the latest task of each agent while it is queued, or running but
        not yet installing.

        Once the dispatcher recorded the installer phase (just before it sends ``upgrade``,
        ``TaskStore.record_phase``) the store refuses In progress -> Cancelled, atomically
        with that record: the item is refused with ``INSTALLER_STARTED`` and the task goes
        on to the agent's report (Updated, Error) or its timeout. Conversely, a task
        cancelled first is never sent ``upgrade`` (``record_phase`` refuses it)."""
        latest = await self._db(self.store.latest_tasks, list(agents))
        items = []
        for agent in agents:
            task = latest.get(agent)
            if task is not None and task.status.active:
                moved = await self.set_status(
                    task,
                    TaskStatus.CANCELLED,
                    None,
                    "Task cancelled by request",
                    "cancelled by request",
                )
                if moved:
                    items.append(
                        {"error": 0, "message": "Success", "agent": agent, "task_id": task.task_id}
                    )
                    continue
                if await self._db(self.store.task_phase, task.task_id) == PHASE_INSTALLING:
                    log.info(
                        "task %d (agent %03d): not cancelled, its installer may be running",
                        task.task_id,
                        agent,
                    )
                    code = TaskCode.INSTALLER_STARTED
                    items.append(
                        {
                            "error": int(code),
                            "message": task_message(code),
                            "agent": agent,
                            "task_id": task.task_id,
                        }
                    )
                    continue
            items.append(
                {
                    "error": int(TaskCode.NO_TASK),
                    "message": task_message(TaskCode.NO_TASK),
                    "agent": agent,
                }
            )
        return items

    # ------------------------------------------------------------------ socket handler

    async def handle(self, req: TaskRequest) -> dict[str, Any]:
        """Serve one parsed task-socket request; never raises."""
        try:
            return await self._handle(req)
        except TaskError as exc:
            log.error("task manager: %s", exc)
            return task_error_reply(TaskCode(exc.code))
        except Exception:
            log.exception("task manager: database failure on %s", req.command)
            return task_error_reply(TaskCode.DATABASE_ERROR)

    async def _handle(self, req: TaskRequest) -> dict[str, Any]:
        ok = task_message(TaskCode.SUCCESS)
        if req.command in ("upgrade", "upgrade_custom"):
            assert req.node is not None and req.module is not None
            # Record only, as the reference's task manager: stored without parameters, so
            # no dispatcher claims it (the caller runs it and reports its status).
            tasks = await self._db(
                self.store.create_tasks,
                list(req.agents),
                req.node,
                req.module,
                req.command,
                None,
            )
            for task in tasks:
                notify(
                    self.pm,
                    "wpk_after_task_created",
                    task=task,
                    params=TaskParams(command=req.command),
                )
            data = [
                {"error": 0, "message": ok, "agent": t.agent_id, "task_id": t.task_id}
                for t in tasks
            ]
            return envelope(0, data, ok)
        if req.command == "upgrade_get_status":
            assert req.node is not None
            data = []
            for agent in req.agents:
                status = await self._db(self.store.get_status, agent, req.node)
                item: dict[str, Any] = {"error": 0, "message": ok, "agent": agent}
                if status is not None:
                    item["status"] = status.value
                data.append(item)
            return envelope(0, data, ok)
        if req.command == "upgrade_update_status":
            try:
                status = TaskStatus(req.params["status"])
            except ValueError:
                status = None
            if status is None or status not in REQUESTABLE_STATUSES:
                log.warning("task manager: status %r cannot be requested", req.params["status"])
                return task_error_reply(TaskCode.DATABASE_ERROR)
            data = []
            moved = await self.update_latest_many(
                req.agents,
                req.node,
                status,
                req.params.get("error_msg"),
                f"update_status from node {req.node}",
            )
            for agent in req.agents:
                if agent in moved:
                    data.append({"error": 0, "message": ok, "agent": agent})
                else:
                    data.append(
                        {
                            "error": int(TaskCode.NO_TASK),
                            "message": task_message(TaskCode.NO_TASK),
                            "agent": agent,
                        }
                    )
            return envelope(0, data, ok)
        if req.command == "upgrade_result":
            return envelope(0, await self.results(req.agents), ok)
        if req.command == "upgrade_cancel_tasks":
            assert req.node is not None
            count = await self.cancel_node_pending(req.node)
            log.info("task manager: cancelled %d pending tasks of node %s", count, req.node)
            return envelope(0, [{"error": 0, "message": ok}], ok)
        if req.command == "upgrade_cancel":
            return envelope(0, await self.cancel_agents(req.agents), ok)
        return task_error_reply(TaskCode.INVALID_COMMAND)

    async def cancel_node_pending(self, node: str) -> int:
        """Pending tasks of ``node`` become Cancelled (reference start-up behaviour)."""
        pending = await self._db(self.store.tasks_in_status, node, TaskStatus.PENDING)
        count = await self._db(self.store.cancel_pending, node)
        for task in pending:
            await self._notify_change(
                task.task_id, TaskStatus.PENDING, TaskStatus.CANCELLED, "manager restarted"
            )
        return count

    # ------------------------------------------------------------------ sweep

    async def sweep_once(self, when: int | None = None) -> int:
        """Time out expired tasks; returns the next deadline (epoch seconds).

        In progress: ``update_time + task_timeout <= when`` (D7: the clock starts when the
        task became Updating). Pending, when ``pending_timeout`` is set:
        ``create_time + pending_timeout <= when``.
        """
        when = now() if when is None else when
        timeout = self.settings.task_timeout
        running = await self._db(self.store.tasks_in_status, None, TaskStatus.IN_PROGRESS)
        due = [t for t in running if (t.update_time or t.create_time) + timeout <= when]
        count, deadline = await self._db(self.store.expire, when, timeout)
        if count:
            log.info("task manager: %d tasks timed out", count)
            for task in due:
                fresh = await self._db(self.store.get_task, task.task_id)
                if fresh is not None and fresh.status is TaskStatus.TIMEOUT:
                    notify(
                        self.pm,
                        "wpk_after_task_status_changed",
                        task=fresh,
                        old_status=TaskStatus.IN_PROGRESS,
                        new_status=TaskStatus.TIMEOUT,
                        reason="task_timeout reached",
                    )
        if self.settings.pending_timeout:
            for task in await self._db(self.store.tasks_in_status, None, TaskStatus.PENDING):
                if task.create_time + self.settings.pending_timeout <= when:
                    await self.set_status(
                        task, TaskStatus.TIMEOUT, None, None, "pending_timeout reached"
                    )
        return deadline

    async def cleanup_once(self, when: int | None = None) -> tuple[int, int]:
        """The daily cleanup: final tasks created ``cleanup_time`` ago or earlier are deleted
        (reference ``delete_old``); their history is kept ``history_retention``. Returns
        (tasks deleted, history rows deleted)."""
        when = now() if when is None else when
        tasks = await self._db(self.store.delete_old, when - self.settings.cleanup_time)
        rows = await self._db(
            self.store.delete_history_before, when - self.settings.history_retention
        )
        if tasks or rows:
            log.info("task manager: deleted %d old tasks and %d old history rows", tasks, rows)
        return tasks, rows

    async def run_sweeper(self, stop: asyncio.Event) -> None:
        """Timeout sweep at each deadline (at most ``sweep_interval`` apart) and a daily
        ``cleanup_once``."""
        last_cleanup = 0
        while not stop.is_set():
            try:
                deadline = await self.sweep_once()
                t = now()
                if t - last_cleanup >= 86400:
                    await self.cleanup_once(t)
                    last_cleanup = t
                wait = max(0.5, min(float(self.settings.sweep_interval), deadline - now()))
            except Exception:
                log.exception("task manager: sweep failed")
                wait = float(self.settings.sweep_interval)
            try:
                await asyncio.wait_for(stop.wait(), timeout=wait)
            except TimeoutError:
                pass
