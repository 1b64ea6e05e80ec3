"""Who the agent says it is at each connection: id, name, version, operating system.

``identity_fn(config)`` returns the callable the transport calls at every (re)connection; it
re-reads the version file each time, so the version an installer wrote is announced after the
upgrade. The version file holds one line such as ``v4.9.0`` (or ``Wazuh v4.9.0``); it is sent
as written (stripped), which ``wpk_upgrade.versions.extract`` understands. OS fields come from
the configuration, else from ``/etc/os-release`` (``ID``, ``VERSION_ID``) on Linux and the
``platform`` module elsewhere (``darwin``, ``windows``).
"""

from __future__ import annotations

import logging
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..models import AgentInfo
from ..versions import extract
from .config import AgentConfig

log = logging.getLogger(__name__)

OS_RELEASE = Path("/etc/os-release")


@dataclass(frozen=True)
class OsInfo:
    platform: str | None
    major: str | None
    minor: str | None
    arch: str | None


def _split_version(version: str) -> tuple[str | None, str | None]:
    parts = version.strip().split(".")
    major = parts[0] or None
    minor = parts[1] if len(parts) > 1 and parts[1] else None
    return major, minor


def parse_os_release(text: str) -> dict[str, str]:
    """``KEY=value`` lines of an os-release file (quotes removed)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            values[key] = value.strip().strip("\"'")
    return values


def detect_os(os_release: Path = OS_RELEASE) -> OsInfo:
    """The running system's platform, major and minor version and architecture."""
    arch = platform.machine() or None
    if sys.platform == "darwin":
        major, minor = _split_version(platform.mac_ver()[0])
        return OsInfo("darwin", major, minor, arch)
    if sys.platform == "win32":
        major, minor = _split_version(platform.version())
        return OsInfo("windows", major, minor, arch)
    try:
        values = parse_os_release(os_release.read_text(errors="replace"))
    except OSError:
        values = {}
    name = values.get("ID", "").lower() or platform.system().lower() or None
    major, minor = _split_version(values.get("VERSION_ID", ""))
    return OsInfo(name, major, minor, arch)


def read_version(path: Path) -> str | None:
    """The first line of the version file, stripped; None (logged) when unusable."""
    try:
        with path.open("r", encoding="utf-8", errors="replace") as fh:
            line = fh.readline().strip()
    except OSError as exc:
        log.warning("cannot read the version file %s: %s", path, exc.strerror)
        return None
    if extract(line) is None:
        log.warning("version file %s holds no version (%r)", path, line[:60])
        return None
    return line


def identity_fn(config: AgentConfig, detected: OsInfo | None = None) -> Callable[[], AgentInfo]:
    """The ``identity()`` callable for ``Transport.run_agent`` (OS detected once, here)."""
    agent = config.agent
    needs_detection = None in (agent.os_platform, agent.os_major, agent.os_minor, agent.os_arch)
    found = detected or (detect_os() if needs_detection else OsInfo(None, None, None, None))

    def identity() -> AgentInfo:
        return AgentInfo(
            agent_id=agent.id,
            name=agent.name,
            version=read_version(config.version_file),
            os_platform=agent.os_platform or found.platform,
            os_major=agent.os_major or found.major,
            os_minor=agent.os_minor or found.minor,
            os_arch=agent.os_arch or found.arch,
            connection_status="active",
        )

    return identity
