"""Request parsing and reply shapes of the two manager sockets (reference §2.2, §2.3).

``parse_upgrade_request`` turns the bytes received on ``queue/tasks/upgrade`` into a typed
``UpgradeRequest`` or raises ``RequestRejected`` carrying the exact reference reply.
``parse_task_request`` does the same for ``queue/tasks/task``. Both never raise anything else,
whatever the input (property-tested with hypothesis).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .errors import TaskCode, UpgradeCode, task_message, upgrade_message
from .untrusted import clip, loads

MAX_AGENT_ID = 2**31 - 1

UPGRADE_COMMANDS = ("upgrade", "upgrade_custom", "upgrade_update_status", "upgrade_result")
TASK_COMMANDS = (
    "upgrade",
    "upgrade_custom",
    "upgrade_get_status",
    "upgrade_update_status",
    "upgrade_result",
    "upgrade_cancel_tasks",
    "upgrade_cancel",
)


def envelope(code: int, data: list[dict[str, Any]], message: str) -> dict[str, Any]:
    """The reference reply envelope ``{"error", "data", "message"}``."""
    return {"error": int(code), "data": data, "message": message}


def upgrade_error_reply(code: UpgradeCode, item_message: str | None = None) -> dict[str, Any]:
    """A whole-request upgrade-socket error: one data item with the specific text."""
    text = upgrade_message(code)
    return envelope(code, [{"error": int(code), "message": item_message or text}], text)


def task_error_reply(code: TaskCode) -> dict[str, Any]:
    """A whole-request task-socket error."""
    text = task_message(code)
    return envelope(code, [{"error": int(code), "message": text}], text)


def dumps(reply: dict[str, Any]) -> bytes:
    """Compact JSON bytes of a reply."""
    return json.dumps(reply, separators=(",", ":"), ensure_ascii=False).encode()


class RequestRejected(Exception):
    """The request cannot be served; ``reply`` is the exact answer to send."""

    def __init__(self, reply: dict[str, Any], detail: str = "") -> None:
        super().__init__(detail or reply.get("message", ""))
        self.reply = reply
        self.detail = detail


@dataclass(frozen=True)
class UpgradeRequest:
    """A parsed upgrade-socket request."""

    command: str
    agents: tuple[int, ...]
    params: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, Any] | None = None


def _loads(raw: bytes) -> Any:
    """Peer JSON: ``ValueError`` also for deep nesting, lone surrogates and NUL (untrusted.py)."""
    return loads(raw)


def _agent_ids(values: list[Any]) -> tuple[int, ...] | None:
    ids = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if isinstance(value, float) and not value.is_integer():
            return None
        ivalue = int(value)
        if ivalue < 0 or ivalue > MAX_AGENT_ID:
            return None
        ids.append(ivalue)
    return tuple(ids)


_UPGRADE_PARAMS: dict[str, dict[str, str]] = {
    "upgrade": {
        "wpk_repo": "string",
        "version": "string",
        "use_http": "bool",
        "force_upgrade": "bool",
        "package_type": "package_type",
    },
    "upgrade_custom": {"file_path": "string", "installer": "string"},
    "upgrade_update_status": {"error": "number", "message": "string", "status": "string"},
    "upgrade_result": {},
}


def _check_param(name: str, kind: str, value: Any) -> str | None:
    if kind == "string" or kind == "package_type":
        if not isinstance(value, str):
            return f'Parameter "{name}" should be a string'
        if kind == "package_type" and value not in ("rpm", "deb"):
            return 'Invalid parameter "package_type", value should be "rpm" or "deb"'
    elif kind == "bool":
        if not isinstance(value, bool):
            return f'Parameter "{name}" should be true or false'
    elif kind == "number" and (isinstance(value, bool) or not isinstance(value, int | float)):
        return f'Parameter "{name}" should be a number'
    return None


def parse_upgrade_request(raw: bytes) -> UpgradeRequest:
    """Parse an upgrade-socket request with the reference's rules and error texts."""
    try:
        msg = _loads(raw)
    except ValueError as exc:
        raise RequestRejected(
            upgrade_error_reply(UpgradeCode.PARSING_ERROR), f"not JSON: {exc}"
        ) from None
    if not isinstance(msg, dict):
        raise RequestRejected(
            upgrade_error_reply(UpgradeCode.PARSING_REQUIRED_PARAMETER), "not a JSON object"
        )
    command = msg.get("command")
    params = msg.get("parameters")
    agents = params.get("agents") if isinstance(params, dict) else None
    if (
        not isinstance(command, str)
        or not isinstance(params, dict)
        or not isinstance(agents, list)
        or not agents
    ):
        raise RequestRejected(
            upgrade_error_reply(UpgradeCode.PARSING_REQUIRED_PARAMETER),
            "command, parameters or parameters.agents missing or of the wrong type",
        )
    ids = _agent_ids(agents)
    if ids is None:
        raise RequestRejected(
            upgrade_error_reply(UpgradeCode.TASK_CONFIGURATIONS, "Agent id not recognized"),
            "an agent id is not a non-negative integer",
        )
    if command not in UPGRADE_COMMANDS:
        raise RequestRejected(
            upgrade_error_reply(UpgradeCode.TASK_CONFIGURATIONS), f"unknown command {clip(command)}"
        )
    origin = msg.get("origin")
    if origin is not None:
        if not isinstance(origin, dict):
            raise RequestRejected(
                upgrade_error_reply(
                    UpgradeCode.TASK_CONFIGURATIONS, 'Parameter "origin" should be an object'
                )
            )
        module = origin.get("module")
        if module is not None and module != "api":
            raise RequestRejected(
                upgrade_error_reply(
                    UpgradeCode.TASK_CONFIGURATIONS,
                    'Invalid parameter "module", value should be "api"',
                )
            )
    spec = _UPGRADE_PARAMS[command]
    clean: dict[str, Any] = {}
    for name, value in params.items():
        kind = spec.get(name)
        if kind is None:
            continue  # unknown keys are ignored (reference)
        problem = _check_param(name, kind, value)
        if problem:
            raise RequestRejected(
                upgrade_error_reply(UpgradeCode.TASK_CONFIGURATIONS, problem), problem
            )
        clean[name] = value
    if command == "upgrade_update_status" and "status" not in clean:
        raise RequestRejected(
            upgrade_error_reply(UpgradeCode.PARSING_REQUIRED_PARAMETER), "status missing"
        )
    return UpgradeRequest(command=command, agents=ids, params=clean, origin=origin)


@dataclass(frozen=True)
class TaskRequest:
    """A parsed task-socket request."""

    command: str
    node: str | None
    module: str | None
    agents: tuple[int, ...]
    params: dict[str, Any] = field(default_factory=dict)


_TASK_REQUIRED: dict[str, tuple[str, ...]] = {
    "upgrade": ("name", "module", "agents"),
    "upgrade_custom": ("name", "module", "agents"),
    "upgrade_get_status": ("name", "agents"),
    "upgrade_update_status": ("name", "status", "agents"),
    "upgrade_result": ("agents",),
    "upgrade_cancel_tasks": ("name",),
    "upgrade_cancel": ("agents",),
}


def _invalid(detail: str) -> RequestRejected:
    return RequestRejected(task_error_reply(TaskCode.INVALID_MESSAGE), detail)


def parse_task_request(raw: bytes) -> TaskRequest:
    """Parse a task-socket request with the reference's rules (§2.3)."""
    try:
        msg = _loads(raw)
    except ValueError as exc:
        raise _invalid(f"not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise _invalid("not a JSON object")
    origin, command, params = msg.get("origin"), msg.get("command"), msg.get("parameters")
    for key, value, kind in (
        ("origin", origin, dict),
        ("command", command, str),
        ("parameters", params, dict),
    ):
        if not isinstance(value, kind):
            raise _invalid(f"Invalid message. '{key}' not found.")
    assert isinstance(origin, dict) and isinstance(params, dict) and isinstance(command, str)
    if command not in _TASK_REQUIRED:
        raise RequestRejected(
            task_error_reply(TaskCode.INVALID_COMMAND), f"unknown command {clip(command)}"
        )
    required = _TASK_REQUIRED[command]
    node = origin.get("name")
    module = origin.get("module")
    if "name" in required and not isinstance(node, str):
        raise _invalid("Invalid message. 'name' not found.")
    if "module" in required and not isinstance(module, str):
        raise _invalid("Invalid message. 'module' not found.")
    agents: tuple[int, ...] = ()
    if "agents" in required:
        raw_agents = params.get("agents")
        if not isinstance(raw_agents, list):
            raise _invalid("Invalid message. 'agents' not found.")
        ids = _agent_ids(raw_agents)
        if ids is None or not ids:
            raise _invalid("Invalid element in array.")
        agents = ids
    clean: dict[str, Any] = {}
    if "status" in required:
        status = params.get("status")
        if not isinstance(status, str):
            raise _invalid("Invalid message. 'status' not found.")
        clean["status"] = status
        error_msg = params.get("error_msg")
        if error_msg is not None:
            if not isinstance(error_msg, str):
                raise _invalid("Invalid message. 'error_msg' is not a string.")
            clean["error_msg"] = error_msg
    return TaskRequest(
        command=command,
        node=node if isinstance(node, str) else None,
        module=module if isinstance(module, str) else None,
        agents=agents,
        params=clean,
    )
