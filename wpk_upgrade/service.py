"""The upgrade service: what the upgrade socket (``queue/tasks/upgrade``) does.

``upgrade`` / ``upgrade_custom``: validate every agent through the ``wpk_validate_agent`` hook
(reference §4 order), refuse duplicates and agents already upgrading (code 10), create one
task per accepted agent atomically, queue them, and answer at once (reference §1.2 step 3).
``upgrade_update_status``: an agent's final report, recorded, then the agent's result file is
cleared. ``upgrade_result``: the task manager's items.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any

import pluggy

from . import layout, versions
from .config import ManagerConfig
from .dispatcher import Dispatcher
from .errors import UpgradeCode, WpkUpgradeError, upgrade_message
from .hookspecs import Rejection, ValidationContext
from .hub import AgentRegistry
from .interfaces import TaskStore, WpkQuery
from .models import AgentInfo, TaskParams, TaskStatus
from .protocol import (
    RequestRejected,
    UpgradeRequest,
    envelope,
    parse_upgrade_request,
    upgrade_error_reply,
)
from .sources import SourceRegistry
from .taskmanager import TaskManager
from .untrusted import LogBudget, clip_text

log = logging.getLogger(__name__)

LEGACY_TARGET_BELOW = "v4.1.0"
REPORT_STATUSES = {"Done": TaskStatus.DONE, "Failed": TaskStatus.FAILED}


def _item(code: UpgradeCode, agent: int) -> dict[str, Any]:
    return {"error": int(code), "message": upgrade_message(code), "agent": agent}


class UpgradeService:
    """Serves the upgrade socket's four commands."""

    def __init__(
        self,
        config: ManagerConfig,
        store: TaskStore,
        pm: pluggy.PluginManager,
        tasks: TaskManager,
        sources: SourceRegistry,
        dispatcher: Dispatcher,
        hub: AgentRegistry,
    ) -> None:
        self.config = config
        self.store = store
        self.pm = pm
        self.tasks = tasks
        self.sources = sources
        self.dispatcher = dispatcher
        self.hub = hub
        self._intake = asyncio.Lock()

    async def handle_raw(self, raw: bytes) -> dict[str, Any]:
        """Parse and serve one request; always returns a reply, never raises."""
        try:
            request = parse_upgrade_request(raw)
        except RequestRejected as rej:
            log.info("upgrade socket: refused request: %s", rej.detail or rej)
            return rej.reply
        try:
            return await self.handle(request)
        except Exception:
            log.exception("upgrade socket: failure serving %s", request.command)
            return upgrade_error_reply(UpgradeCode.TASK_MANAGER_COMMUNICATION)

    async def handle(self, request: UpgradeRequest) -> dict[str, Any]:
        if request.command in ("upgrade", "upgrade_custom"):
            return await self.create(request)
        if request.command == "upgrade_result":
            return envelope(0, await self.tasks.results(request.agents), "Success")
        return envelope(0, await self.agent_report(request.agents, request.params), "Success")

    # ------------------------------------------------------------------ upgrade requests

    def _params(self, request: UpgradeRequest) -> TaskParams:
        p = request.params
        if request.command == "upgrade_custom":
            return TaskParams(
                command="upgrade_custom",
                file_path=p.get("file_path"),
                installer=p.get("installer"),
            )
        version = p.get("version")
        return TaskParams(
            command="upgrade",
            version=versions.normalise(version) if version else None,
            wpk_repo=p.get("wpk_repo"),
            use_http=bool(p.get("use_http", False)),
            force_upgrade=bool(p.get("force_upgrade", False)),
            package_type=p.get("package_type"),
        )

    def _installer_problem(self, params: TaskParams) -> str | None:
        """Why an ``upgrade_custom`` installer is refused (the custom source's rule: a plain
        file name of the package, no path, no ``..``), or None."""
        if params.command != "upgrade_custom" or params.installer is None:
            return None
        check = getattr(self.sources.custom(), "validate_installer", None)
        if check is None:
            return None
        try:
            check(params.installer)
        except ValueError as exc:
            return clip_text(str(exc))
        return None

    async def _default_target(self, agent: AgentInfo, params: TaskParams) -> str | None:
        """Decision D1: the newest version in the repository for the agent's platform;
        else the configured ``manager_version``."""
        repo = params.wpk_repo or self.config.upgrade.wpk_repository
        if repo:
            try:
                base = layout.base_url(
                    params.wpk_repo, self.config.upgrade.wpk_repository, "v0.0.0", params.use_http
                )
                platform = (agent.os_platform or "").lower()
                query = WpkQuery(
                    base_url=base,
                    version="",
                    os_platform=platform,
                    os_major=agent.os_major,
                    os_minor=agent.os_minor,
                    os_arch=agent.os_arch,
                    package_type=layout.package_type(
                        platform, params.package_type, params.force_upgrade
                    ),
                    agent_id=agent.agent_id,
                )
                source = self.sources.for_url(base)
                latest = await self.sources.call(source.latest_version, query)
                if latest:
                    return latest
            except WpkUpgradeError as exc:
                log.info("agent %03d: latest version not known yet (%s)", agent.agent_id, exc)
        return self.config.manager_version

    async def create(self, request: UpgradeRequest) -> dict[str, Any]:
        base_params = self._params(request)
        problem = self._installer_problem(base_params)
        if problem is not None:
            log.warning("upgrade socket: refused upgrade_custom: %s", problem)
            return upgrade_error_reply(UpgradeCode.TASK_CONFIGURATIONS, problem)
        agents = await asyncio.to_thread(self.store.get_agents, list(request.agents))
        unwritten = [a for a in set(request.agents) if a not in agents and self.hub.link(a)]
        if unwritten:  # connected here a moment ago: the registry row is being written
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self.hub.drain()
            agents.update(await asyncio.to_thread(self.store.get_agents, unwritten))
        for agent_id, agent in agents.items():
            if agent.connection_status != "active" and self.hub.link(agent_id) is not None:
                # connected here a moment ago: the store row is still being rewritten
                agents[agent_id] = dataclasses.replace(
                    agent, connection_status="active", node=self.config.node_name
                )
        rejected: list[dict[str, Any]] = []
        accepted: list[int] = []
        per_agent: dict[int, TaskParams] = {}
        seen: set[int] = set()
        targets: dict[tuple[Any, ...], str | None] = {}
        by_target: dict[str | None, TaskParams] = {}
        contexts: dict[str | None, ValidationContext] = {}
        budget = LogBudget()  # one request naming 10,000 agents: 10 lines, not 10,000
        for agent_id in request.agents:
            agent = agents.get(agent_id)
            if agent_id in seen:
                rejected.append(_item(UpgradeCode.UPGRADE_ALREADY_IN_PROGRESS, agent_id))
                continue
            seen.add(agent_id)
            params = base_params
            target = params.version
            if params.command == "upgrade" and target is None and agent is not None:
                key = (agent.os_platform, agent.os_major, agent.os_minor, agent.os_arch)
                if key not in targets:
                    targets[key] = await self._default_target(agent, params)
                target = targets[key]
            context = contexts.get(target)
            if context is None:
                context = contexts[target] = ValidationContext(
                    node=self.config.node_name,
                    manager_version=self.config.manager_version,
                    target_version=target,
                )
            found: list[Rejection] = [
                r
                for r in self.pm.hook.wpk_validate_agent(
                    agent_id=agent_id, agent=agent, params=params, context=context
                )
                if r is not None
            ]
            if found:
                first = min(found, key=lambda r: r.order)
                for r in found if budget.take() else ():
                    log.info(
                        "agent %03d refused: %s (%s)", agent_id, upgrade_message(r.code), r.detail
                    )
                rejected.append(_item(UpgradeCode(first.code), agent_id))
                continue
            if params.command == "upgrade":
                # one TaskParams per target, not per agent (10,000 agents, a few targets)
                if target not in by_target:
                    legacy = bool(params.version) and _below(params.version, LEGACY_TARGET_BELOW)
                    by_target[target] = TaskParams(
                        **{**params.__dict__, "version": target, "legacy_target": legacy}
                    )
                params = by_target[target]
            accepted.append(agent_id)
            per_agent[agent_id] = params
        if budget.skipped:
            log.info("%d more agents refused (not logged one by one)", budget.skipped)
        if not accepted:
            log.warning("There are no valid agents to upgrade.")
            return envelope(0, rejected, "Success")
        created = []
        busy: list[int] = []
        async with self._intake:
            # A task belongs to the node its agent is connected to: that node pushes it
            # (it claims it from the shared store). Agents sharing the same parameters and
            # node are created in one atomic batch.
            groups: dict[tuple[TaskParams, str], list[int]] = {}
            for agent_id in accepted:
                key = (per_agent[agent_id], self._node_of(agent_id, agents.get(agent_id)))
                groups.setdefault(key, []).append(agent_id)
            for (params, node), ids in groups.items():
                made, taken = await self.tasks.create_if_idle(ids, node, params.command, params)
                created.extend(made)
                busy.extend(taken)
        for agent_id in busy:
            rejected.append(_item(UpgradeCode.UPGRADE_ALREADY_IN_PROGRESS, agent_id))
        order = {a: i for i, a in enumerate(request.agents)}
        created.sort(key=lambda t: order.get(t.agent_id, 0))
        data = rejected + [
            {"error": 0, "message": "Success", "agent": t.agent_id, "task_id": t.task_id}
            for t in created
        ]
        for task in created:
            if task.node == self.config.node_name:
                self.dispatcher.submit(task.task_id)
        return envelope(0, data, "Success")

    def _node_of(self, agent_id: int, agent: AgentInfo | None) -> str:
        """The node that runs an agent's task: the one it is connected to (a live link here
        wins over a store row not yet rewritten), else this one."""
        if self.hub.link(agent_id) is not None:
            return self.config.node_name
        if agent is not None and agent.node and agent.connection_status == "active":
            return agent.node
        return self.config.node_name

    # ------------------------------------------------------------------ agent reports

    async def agent_report(
        self, agents: tuple[int, ...] | list[int], params: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """Record an agent's final report (reference §7.6) and clear its result file."""
        status = REPORT_STATUSES.get(str(params.get("status")))
        error = params.get("error", 0)
        message = params.get("message", "")
        budget = LogBudget()
        for agent_id in agents:
            if budget.take():
                log.info(
                    "Received upgrade notification from agent '%d'. Error code: '%s', "
                    "message: '%s'",
                    agent_id,
                    clip_text(str(error)),
                    clip_text(str(message)),
                )
        no_task = {"error": 3, "message": "No task in DB"}
        if status is None:
            items = [{**no_task, "agent": agent_id} for agent_id in agents]
        else:
            error_msg = None
            if error:
                code = (
                    UpgradeCode.UPGRADE_ERROR_MISSING_PACKAGE
                    if error == 1
                    else UpgradeCode.UPGRADE_ERROR
                )
                error_msg = upgrade_message(code)
            moved = await self.tasks.update_latest_many(
                list(agents),
                self.config.node_name,
                status,
                error_msg,
                f"agent report: error {error}: {clip_text(str(message))}",
            )
            items = []
            for agent_id in agents:
                ok = agent_id in moved
                items.append({"error": 0, "message": "Success"} if ok else dict(no_task))
                items[-1]["agent"] = agent_id
                self._clear_agent_result(agent_id)
        if budget.skipped:
            log.info("%d more upgrade notifications (not logged one by one)", budget.skipped)
        return items

    def _clear_agent_result(self, agent_id: int) -> None:
        link = self.hub.link(agent_id)
        if link is None:
            return

        async def clear() -> None:
            try:
                reply = await link.request(
                    "upgrade",
                    '{"command":"clear_upgrade_result","parameters":{}}',
                    self.config.upgrade.command_timeout,
                )
                log.info("agent %03d: clear_upgrade_result answered %s", agent_id, reply)
            except (TimeoutError, ConnectionError, OSError) as exc:
                log.warning("agent %03d: clear_upgrade_result failed: %s", agent_id, exc)

        task = asyncio.get_running_loop().create_task(clear())
        self.dispatcher.running_aux.add(task)
        task.add_done_callback(self.dispatcher.running_aux.discard)


def _below(version: str, bound: str) -> bool:
    try:
        return versions.compare(version, bound) < 0
    except ValueError:
        return False
