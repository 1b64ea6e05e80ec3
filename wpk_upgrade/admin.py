"""Admin commands of the task socket: listings the reference sockets do not offer.

Extensions (docs/compatibility.md), served on ``queue/tasks/task`` beside the reference's
commands and routed by the daemon *before* the reference parser; same framing and envelope
``{"error", "data", "message"}``. ``origin`` is optional; ``parameters`` defaults to ``{}``.

``agents_list``
    ``parameters``: ``agents`` (optional list of ids), ``target`` (optional object with
    ``version``, ``wpk_repo``, ``use_http``, ``package_type``, ``force``). One item per known
    agent: id, name, version, OS, connection status, node, last seen, and ``upgrade`` (the
    latest task: ``task_id``, ``status``, ``error_msg``). With ``target``, each item also has
    ``target`` (the given version, else the newest the repository offers for the agent's
    platform, else ``manager_version``; decision D1) and ``outdated`` (true, false, or null
    when a version cannot be compared).
``tasks_list``
    ``parameters``: ``statuses`` (stored names such as ``In progress`` or the shown words such
    as ``Updating``, any case), ``agents``, ``node``, ``since`` / ``until`` (epoch seconds, bound
    the create time), ``limit`` (default 1000, 0 = no limit). Items are ``upgrade_result`` items,
    newest first.
``task_history``
    ``parameters``: ``task_id``. Items are the task's transitions, oldest first (a reason
    quoting a URL shows it without its password).

A malformed request answers error 1 "Invalid message" with a ``detail`` naming the fault.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from . import layout, versions
from .config import ManagerConfig
from .errors import TaskCode, WpkUpgradeError, task_message
from .interfaces import TaskFilter, TaskStore, WpkQuery
from .logging_setup import Redactor
from .models import AgentInfo, Task, TaskStatus, format_time
from .protocol import MAX_AGENT_ID, envelope, task_error_reply
from .sources import SourceRegistry
from .taskmanager import result_item

log = logging.getLogger(__name__)

ADMIN_COMMANDS = ("agents_list", "tasks_list", "task_history")
_MARKERS = tuple(c.encode() for c in ADMIN_COMMANDS)
DEFAULT_LIMIT = 1000
#: History reasons may quote a repository URL: its password is not shown.
REDACT = Redactor()


class AdminRequestError(ValueError):
    """A malformed admin request; the text says which parameter is wrong."""


def parse_status(text: str) -> TaskStatus:
    """A status from its stored name (``In progress``) or shown word (``Updating``), any case."""
    wanted = text.strip().lower()
    for status in TaskStatus:
        if wanted in (status.value.lower(), status.display.lower()):
            return status
    choices = ", ".join(s.display for s in TaskStatus)
    raise AdminRequestError(f"unknown status {text!r} (one of {choices})")


def _ids(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise AdminRequestError(f'"{name}" must be a list of agent ids')
    out = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item <= MAX_AGENT_ID:
            raise AdminRequestError(f'"{name}" must be a list of agent ids')
        out.append(item)
    return tuple(out)


def _int(params: dict[str, Any], name: str, minimum: int = 0) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value < 2**63:
        # (the upper bound: no store takes a wider integer; hardening R1)
        raise AdminRequestError(f'"{name}" must be an integer >= {minimum}')
    return value


def _str(params: dict[str, Any], name: str) -> str | None:
    value = params.get(name)
    if value is not None and not isinstance(value, str):
        raise AdminRequestError(f'"{name}" must be a string')
    return value


@dataclass(frozen=True)
class TargetSpec:
    """How ``agents_list`` picks each agent's target version."""

    version: str | None = None
    wpk_repo: str | None = None
    use_http: bool = False
    package_type: str | None = None
    force: bool = False


def parse_target(value: Any) -> TargetSpec:
    """The ``target`` parameter of ``agents_list``."""
    if not isinstance(value, dict):
        raise AdminRequestError('"target" must be an object')
    version = _str(value, "version")
    if version is not None:
        if not versions.is_valid(version):
            raise AdminRequestError(f"invalid version {version!r} (expected vX.Y.Z)")
        version = versions.normalise(version)
    package_type = _str(value, "package_type")
    if package_type not in (None, "rpm", "deb"):
        raise AdminRequestError('"package_type" must be "rpm" or "deb"')
    flags = {}
    for name in ("use_http", "force"):
        flag = value.get(name, False)
        if not isinstance(flag, bool):
            raise AdminRequestError(f'"{name}" must be true or false')
        flags[name] = flag
    return TargetSpec(
        version=version,
        wpk_repo=_str(value, "wpk_repo"),
        package_type=package_type,
        **flags,
    )


def parse_filter(params: dict[str, Any]) -> TaskFilter:
    """The ``tasks_list`` parameters as a store filter."""
    statuses = params.get("statuses")
    parsed: tuple[TaskStatus, ...] | None = None
    if statuses is not None:
        if not isinstance(statuses, list) or not all(isinstance(s, str) for s in statuses):
            raise AdminRequestError('"statuses" must be a list of status names')
        parsed = tuple(parse_status(s) for s in statuses)
    agents = params.get("agents")
    limit = _int(params, "limit")
    return TaskFilter(
        statuses=parsed,
        agent_ids=_ids(agents, "agents") if agents is not None else None,
        node=_str(params, "node"),
        since=_int(params, "since"),
        until=_int(params, "until"),
        limit=DEFAULT_LIMIT if limit is None else limit,
    )


def agent_item(agent: AgentInfo, latest: Task | None) -> dict[str, Any]:
    """One ``agents_list`` item."""
    item: dict[str, Any] = {
        "agent": agent.agent_id,
        "name": agent.name,
        "version": agent.version,
        "os_platform": agent.os_platform,
        "os_major": agent.os_major,
        "os_minor": agent.os_minor,
        "os_arch": agent.os_arch,
        "connection_status": agent.connection_status,
        "node": agent.node,
        "last_seen": format_time(agent.last_seen),
    }
    if latest is not None:
        upgrade: dict[str, Any] = {"task_id": latest.task_id, "status": latest.status.display}
        error_msg = latest.error_msg or latest.status.sentence
        if error_msg:
            upgrade["error_msg"] = error_msg
        item["upgrade"] = upgrade
    return item


def is_outdated(agent_version: str | None, target: str | None) -> bool | None:
    """True when the agent runs a version below ``target``; None when either is unknown."""
    current = versions.extract(agent_version)
    if not current or not target:
        return None
    try:
        return versions.compare(current, target) < 0
    except ValueError:
        return None


class Admin:
    """Serves the admin commands over a task store (store calls run in worker threads)."""

    def __init__(self, config: ManagerConfig, store: TaskStore, sources: SourceRegistry) -> None:
        self.config = config
        self.store = store
        self.sources = sources

    @staticmethod
    def wants(raw: bytes) -> bool:
        """Cheap test: could ``raw`` be an admin command? (False for every reference one.)"""
        return any(marker in raw for marker in _MARKERS)

    async def maybe_handle(self, raw: bytes) -> dict[str, Any] | None:
        """The reply to an admin command, or None when ``raw`` is not one."""
        if not self.wants(raw):
            return None
        try:
            msg = json.loads(raw.decode("utf-8"))
        except ValueError:
            return None
        if not isinstance(msg, dict) or msg.get("command") not in ADMIN_COMMANDS:
            return None
        params = msg.get("parameters", {})
        if not isinstance(params, dict):
            return self._invalid("'parameters' must be an object")
        try:
            return await self.handle(str(msg["command"]), params)
        except AdminRequestError as exc:
            log.info("task socket: refused %s: %s", msg["command"], exc)
            return self._invalid(str(exc))
        except Exception:
            log.exception("task socket: %s failed", msg["command"])
            return task_error_reply(TaskCode.DATABASE_ERROR)

    @staticmethod
    def _invalid(detail: str) -> dict[str, Any]:
        return {**task_error_reply(TaskCode.INVALID_MESSAGE), "detail": detail}

    async def handle(self, command: str, params: dict[str, Any]) -> dict[str, Any]:
        """Serve one admin command (``AdminRequestError`` for bad parameters)."""
        ok = task_message(TaskCode.SUCCESS)
        if command == "agents_list":
            agents = params.get("agents")
            wanted = _ids(agents, "agents") if agents is not None else None
            target = parse_target(params["target"]) if "target" in params else None
            return envelope(0, await self.agents(wanted, target), ok)
        if command == "tasks_list":
            flt = parse_filter(params)
            tasks = await asyncio.to_thread(self.store.list_tasks, flt)
            return envelope(0, [result_item(t.agent_id, t) for t in tasks], ok)
        task_id = _int(params, "task_id", 1)
        if task_id is None:
            raise AdminRequestError('"task_id" is required')
        return await self.history(task_id)

    async def agents(
        self, wanted: tuple[int, ...] | None, target: TargetSpec | None
    ) -> list[dict[str, Any]]:
        """``agents_list`` items, by agent id."""
        known = await asyncio.to_thread(self.store.list_agents)
        if wanted is not None:
            keep = set(wanted)
            known = [a for a in known if a.agent_id in keep]
        latest = await asyncio.to_thread(self.store.latest_tasks, [a.agent_id for a in known])
        items = []
        targets: dict[tuple[Any, ...], str | None] = {}
        for agent in sorted(known, key=lambda a: a.agent_id):
            item = agent_item(agent, latest.get(agent.agent_id))
            if target is not None:
                key = (agent.os_platform, agent.os_major, agent.os_minor, agent.os_arch)
                if key not in targets:
                    targets[key] = await self.target_of(agent, target)
                item["target"] = targets[key]
                item["outdated"] = is_outdated(agent.version, targets[key])
            items.append(item)
        return items

    async def target_of(self, agent: AgentInfo, spec: TargetSpec) -> str | None:
        """The version an upgrade of ``agent`` would install (decision D1)."""
        if spec.version:
            return spec.version
        configured = self.config.upgrade.wpk_repository
        if spec.wpk_repo or configured:
            try:
                base = layout.base_url(spec.wpk_repo, configured, "v0.0.0", spec.use_http)
                platform = (agent.os_platform or "").lower()
                query = WpkQuery(
                    base_url=base,
                    version="",
                    os_platform=platform,
                    os_major=agent.os_major,
                    os_minor=agent.os_minor,
                    os_arch=agent.os_arch,
                    package_type=layout.package_type(platform, spec.package_type, spec.force),
                    agent_id=agent.agent_id,
                )
                source = self.sources.for_url(base)
                latest = await self.sources.call(source.latest_version, query)
                if latest:
                    return latest
            except WpkUpgradeError as exc:
                log.info("agent %03d: newest version not known (%s)", agent.agent_id, exc)
        return self.config.manager_version

    async def history(self, task_id: int) -> dict[str, Any]:
        """``task_history``: the task's transitions, oldest first."""
        task = await asyncio.to_thread(self.store.get_task, task_id)
        if task is None:
            return {**task_error_reply(TaskCode.NO_TASK), "detail": f"no task {task_id}"}
        changes = await asyncio.to_thread(self.store.history, task_id)
        data = [
            {
                "task_id": c.task_id,
                "agent": task.agent_id,
                "from": c.from_status.display if c.from_status is not None else None,
                "to": c.to_status.display,
                "time": format_time(c.time),
                "node": c.node,
                "reason": REDACT(c.reason) if c.reason else c.reason,
            }
            for c in changes
        ]
        return envelope(0, data, task_message(TaskCode.SUCCESS))
