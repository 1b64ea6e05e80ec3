"""pluggy hook specifications: validation rules and lifecycle events.

Hooks answer "everyone who cares, react or veto". Every implementation of a hook is called.
Names start with ``wpk_``; plugins register through the entry-point group ``wpk_upgrade.hooks``.
Hooks grow only by adding arguments (pluggy lets an implementation take a subset).

Notification hooks (``wpk_after_*``, ``wpk_transfer_progress``) never break an upgrade: the
kernel logs their errors and goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .models import AgentInfo, Task, TaskParams, TaskStatus

PROJECT = "wpk_upgrade"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class Rejection:
    """A validation rule's veto.

    ``code`` is an ``UpgradeCode`` value, ``order`` the rule's position in the reference's
    validation order (lower runs first): the reply carries the lowest-order rejection's code,
    every rejection is logged with its ``detail``.
    """

    code: int
    order: int
    detail: str = ""


@dataclass(frozen=True)
class ValidationContext:
    """Facts a rule may use beside the agent and the request."""

    node: str
    manager_version: str | None
    target_version: str | None


@hookspec
def wpk_validate_agent(
    agent_id: int,
    agent: AgentInfo | None,
    params: TaskParams,
    context: ValidationContext,
) -> Rejection | None:
    """Check whether ``agent_id`` may be upgraded as ``params`` asks.

    Fires once per requested agent on ``upgrade``/``upgrade_custom``, before any task exists.
    ``agent`` is None when the agent is unknown. ``context.target_version`` is the version the
    upgrade will install (None for ``upgrade_custom`` or when it cannot be known yet).
    Return a ``Rejection`` to refuse, None to accept.
    """


@hookspec
def wpk_after_task_created(task: Task, params: TaskParams) -> None:
    """A task was stored (status Pending). Notification only."""


@hookspec
def wpk_after_task_status_changed(
    task: Task, old_status: TaskStatus | None, new_status: TaskStatus, reason: str | None
) -> None:
    """A task moved from ``old_status`` to ``new_status`` (``task`` is the new state)."""


@hookspec
def wpk_transfer_progress(task_id: int, agent_id: int, sent: int, total: int) -> None:
    """Bytes of a WPK delivered to an agent so far. Fires at a bounded rate."""
