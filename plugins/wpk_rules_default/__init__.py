"""The reference's per-agent validation rules (reference §4), one hook implementation each.

Each rule is registered through its own ``wpk_upgrade.hooks`` entry point (``rules_*``),
exactly like a third-party rules plugin. Each rule returns a ``Rejection`` or None; ``order``
reproduces the reference's validation order (ID, agent info, status, system, version), so
the reply carries the same code the reference would give.
"""

from __future__ import annotations

from wpk_upgrade import versions
from wpk_upgrade.errors import UpgradeCode
from wpk_upgrade.hookspecs import Rejection, ValidationContext, hookimpl
from wpk_upgrade.models import AgentInfo, TaskParams

BLACKLISTED_PLATFORMS = frozenset({"solaris", "sunos", "aix", "hp-ux", "bsd"})
ROLLING_PLATFORMS = frozenset({"opensuse-tumbleweed", "arch"})
UNSUPPORTED_MAJORS = {"sles": "11", "suse": "11", "ol": "5", "rhel": "5", "centos": "5"}
MIN_VERSION = "v3.0.0"
MIN_DARWIN_VERSION = "v4.3.0"

ORDER_ID, ORDER_INFO, ORDER_STATUS, ORDER_SYSTEM, ORDER_VERSION = 10, 20, 30, 40, 50


class ManagerId:
    """Agent 0 is the manager itself (code 7)."""

    @hookimpl
    def wpk_validate_agent(self, agent_id: int) -> Rejection | None:
        if agent_id == 0:
            return Rejection(UpgradeCode.INVALID_ACTION_FOR_MANAGER, ORDER_ID, "agent 000")
        return None


class AgentKnown:
    """The agent must be known to the manager (code 6)."""

    @hookimpl
    def wpk_validate_agent(self, agent_id: int, agent: AgentInfo | None) -> Rejection | None:
        if agent is None and agent_id != 0:
            return Rejection(UpgradeCode.GLOBAL_DB_FAILURE, ORDER_INFO, "unknown agent")
        return None


class AgentActive:
    """Only an agent whose connection status is ``active`` can be upgraded (code 8)."""

    @hookimpl
    def wpk_validate_agent(self, agent: AgentInfo | None) -> Rejection | None:
        if agent is not None and not agent.active:
            return Rejection(
                UpgradeCode.AGENT_IS_NOT_ACTIVE,
                ORDER_STATUS,
                f"connection status is {agent.connection_status!r}",
            )
        return None


def system_problem(agent: AgentInfo) -> Rejection | None:
    """Reference §4.4 (4.9+ logic): platform data present and not blacklisted."""
    platform = (agent.os_platform or "").lower()
    if not platform:
        return Rejection(UpgradeCode.GLOBAL_DB_FAILURE, ORDER_SYSTEM, "no OS platform")
    if platform in BLACKLISTED_PLATFORMS:
        return Rejection(
            UpgradeCode.SYSTEM_NOT_SUPPORTED, ORDER_SYSTEM, f"platform {platform} is not supported"
        )
    if platform == "windows":
        return None
    if platform == "darwin":
        if not agent.os_arch:
            return Rejection(UpgradeCode.GLOBAL_DB_FAILURE, ORDER_SYSTEM, "no architecture")
        return None
    if platform in ROLLING_PLATFORMS:
        if not agent.os_arch:
            return Rejection(UpgradeCode.GLOBAL_DB_FAILURE, ORDER_SYSTEM, "no architecture")
        return None
    if not agent.os_arch or not agent.os_major or (platform == "ubuntu" and not agent.os_minor):
        return Rejection(
            UpgradeCode.GLOBAL_DB_FAILURE, ORDER_SYSTEM, "architecture or OS version missing"
        )
    if UNSUPPORTED_MAJORS.get(platform) == str(agent.os_major):
        return Rejection(
            UpgradeCode.SYSTEM_NOT_SUPPORTED,
            ORDER_SYSTEM,
            f"{platform} {agent.os_major} is not supported",
        )
    return None


class SystemSupported:
    """The agent's operating system must be one WPKs exist for (codes 6 and 9)."""

    @hookimpl
    def wpk_validate_agent(self, agent: AgentInfo | None) -> Rejection | None:
        return None if agent is None else system_problem(agent)


def version_problem(
    agent: AgentInfo, params: TaskParams, context: ValidationContext
) -> Rejection | None:
    """Reference §4.5: minimum versions, then (``upgrade`` only, without force) the target
    must be newer than the agent and not above the manager's version."""
    current = versions.extract(agent.version)
    if current is None:
        return Rejection(UpgradeCode.GLOBAL_DB_FAILURE, ORDER_VERSION, "no agent version")
    if versions.compare(current, MIN_VERSION) < 0:
        return Rejection(
            UpgradeCode.NOT_MINIMAL_VERSION_SUPPORTED,
            ORDER_VERSION,
            f"agent {current} is older than {MIN_VERSION}",
        )
    if (agent.os_platform or "").lower() == "darwin" and versions.compare(
        current, MIN_DARWIN_VERSION
    ) < 0:
        return Rejection(
            UpgradeCode.NOT_MINIMAL_VERSION_SUPPORTED,
            ORDER_VERSION,
            f"macOS agent {current} is older than {MIN_DARWIN_VERSION}",
        )
    if params.command != "upgrade" or params.force_upgrade:
        return None
    target = context.target_version
    if target is None:
        return None
    try:
        if versions.compare(current, target) >= 0:
            return Rejection(
                UpgradeCode.NEW_VERSION_LEES_OR_EQUAL_THAT_CURRENT,
                ORDER_VERSION,
                f"agent {current} >= target {target}",
            )
        if context.manager_version and versions.compare(target, context.manager_version) > 0:
            return Rejection(
                UpgradeCode.NEW_VERSION_GREATER_MASTER,
                ORDER_VERSION,
                f"target {target} > manager {context.manager_version}",
            )
    except ValueError:
        return None  # a malformed target fails later, asynchronously, with code 15
    return None


class VersionAllowed:
    """Minimum agent versions and target/agent/manager version comparisons (11, 12, 13)."""

    @hookimpl
    def wpk_validate_agent(
        self, agent: AgentInfo | None, params: TaskParams, context: ValidationContext
    ) -> Rejection | None:
        return None if agent is None else version_problem(agent, params, context)


# One plugin object per rule; each is its own ``wpk_upgrade.hooks`` entry point.
MANAGER_ID = ManagerId()
AGENT_KNOWN = AgentKnown()
AGENT_ACTIVE = AgentActive()
SYSTEM_SUPPORTED = SystemSupported()
VERSION_ALLOWED = VersionAllowed()
