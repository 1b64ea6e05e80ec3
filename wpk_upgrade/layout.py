"""WPK repository layout: base URL, package type, architecture names, directory and file name.

Pure functions (no I/O) implementing reference §5.1-5.3 and the package-type inference of §4.4.
One deliberate difference (reference §11 item 7): the scheme of a repository base is detected
only as a prefix (``http://``, ``https://``, ``file://``, ``s3://``, case-insensitive), not as a
substring anywhere in the text.
"""

from __future__ import annotations

import logging
import re

from . import versions
from .errors import UpgradeCode, UpgradeError
from .interfaces import WpkQuery

log = logging.getLogger(__name__)

#: Longest repository base URL accepted (the reference caps it at about 512 characters).
MAX_BASE_URL = 2048

DEFAULT_HOST = "packages.wazuh.com"

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_STRICT_TARGET = re.compile(r"^v?(\d+)\.\d+\.\d+")
#: What may appear in one path component taken from agent data or the request.
_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+\-]*$")

DEB_PLATFORMS = frozenset({"debian", "ubuntu"})
RPM_PLATFORMS = frozenset(
    {
        "amzn",
        "centos",
        "fedora",
        "ol",
        "opensuse",
        "opensuse-leap",
        "opensuse-tumbleweed",
        "rhel",
        "sles",
        "suse",
        "rocky",
        "almalinux",
    }
)

V3_4 = "v3.4.0"
V4_0 = "v4.0.0"
V4_9 = "v4.9.0"


def base_url(wpk_repo: str | None, configured: str | None, target: str, use_http: bool) -> str:
    """The repository base URL for ``target`` (reference §5.1), scheme included, ending in ``/``.

    The request's ``wpk_repo`` wins over the configured ``wpk_repository``; without either the
    official repository is used (``packages.wazuh.com/wpk/`` below v4.0.0, else
    ``packages.wazuh.com/<major>.x/wpk/``). A target whose major cannot be parsed then raises
    ``UpgradeError`` 15. A base that does not start with a known scheme gets ``https://``
    (``http://`` with ``use_http``). A base longer than ``MAX_BASE_URL`` raises 14.
    """
    repo = (wpk_repo or "").strip() or (configured or "").strip()
    if not repo:
        m = _STRICT_TARGET.match((target or "").strip())
        if not m:
            raise UpgradeError(
                UpgradeCode.WPK_VERSION_DOES_NOT_EXIST,
                f"cannot parse the major version of {target!r}",
            )
        major = int(m.group(1))
        repo = f"{DEFAULT_HOST}/wpk/" if major < 4 else f"{DEFAULT_HOST}/{major}.x/wpk/"
    if not _SCHEME.match(repo):
        repo = ("http://" if use_http else "https://") + repo
    if not repo.endswith("/"):
        repo += "/"
    if len(repo) > MAX_BASE_URL:
        raise UpgradeError(
            UpgradeCode.URL_NOT_FOUND,
            f"repository URL is {len(repo)} characters long (at most {MAX_BASE_URL})",
        )
    return repo


def inferred_package_type(os_platform: str | None) -> str | None:
    """The package type an agent's platform implies (reference §4.4), or None."""
    platform = (os_platform or "").lower()
    if platform == "windows":
        return "msi"
    if platform == "darwin":
        return "pkg"
    if platform in DEB_PLATFORMS:
        return "deb"
    if platform in RPM_PLATFORMS:
        return "rpm"
    return None


def package_type(
    os_platform: str | None, requested: str | None, force: bool, agent_id: int = 0
) -> str | None:
    """The package type to use (reference §5.3).

    A requested type replaces the agent's own only with ``force``; a platform with no type of
    its own takes the requested one; None when there is neither (the caller then fails with 9,
    which ``locate`` does for Linux targets >= v4.9.0).
    """
    own = inferred_package_type(os_platform)
    if own is not None:
        if requested and requested != own:
            if force:
                log.debug(
                    "Agent '%s' with platform '%s' will be upgraded using package '%s'",
                    agent_id,
                    os_platform,
                    requested,
                )
                return requested
            log.warning(
                "Agent '%s' with platform '%s' won't be upgraded using package '%s' without "
                "the force option. Ignoring...",
                agent_id,
                os_platform,
                requested,
            )
        return own
    if requested:
        log.debug(
            "Agent '%s' with unsupported platform '%s' will be upgraded using package '%s'",
            agent_id,
            os_platform,
            requested,
        )
        return requested
    log.warning(
        "Agent '%s' with unsupported platform '%s' won't be upgraded without a default package.",
        agent_id,
        os_platform,
    )
    return None


def translate_arch(arch: str, package_type: str | None) -> str:
    """Architecture name used in >= v4.9.0 paths (reference §5.3).

    ``x86_64`` is ``amd64`` for deb and ``intel64`` for macOS pkg; ``aarch64`` is ``arm64`` for
    both; rpm and anything else keep the agent's name.
    """
    if package_type == "deb":
        return {"x86_64": "amd64", "aarch64": "arm64"}.get(arch, arch)
    if package_type == "pkg":
        return {"x86_64": "intel64", "aarch64": "arm64"}.get(arch, arch)
    return arch


def default_installer(os_platform: str | None) -> str:
    """The installer run inside a WPK when the request names none (reference §1.3)."""
    return "upgrade.bat" if (os_platform or "").lower() == "windows" else "upgrade.sh"


def _component(value: str | None, what: str, code: UpgradeCode) -> str:
    if not value or not _COMPONENT.match(value) or ".." in value:
        raise UpgradeError(code, f"unusable {what} {value!r} for a repository path")
    return value


def locate(query: WpkQuery) -> tuple[str, str]:
    """The directory URL (ending in ``/``) and WPK file name for ``query`` (reference §5.2).

    Raises ``UpgradeError`` 15 when the target version cannot be parsed and 9 when the
    platform data needed by the layout is missing (no package type for a Linux target
    >= v4.9.0, unknown architecture or OS version).
    """
    unsupported = UpgradeCode.SYSTEM_NOT_SUPPORTED
    ver = _component(query.version, "version", UpgradeCode.WPK_VERSION_DOES_NOT_EXIST)
    try:
        at_least_4_9 = versions.compare(ver, V4_9) >= 0
        at_least_3_4 = versions.compare(ver, V3_4) >= 0
    except ValueError as exc:
        raise UpgradeError(UpgradeCode.WPK_VERSION_DOES_NOT_EXIST, str(exc)) from exc
    base = query.base_url if query.base_url.endswith("/") else query.base_url + "/"
    platform = _component(query.os_platform, "platform", unsupported)
    lower = platform.lower()

    if lower == "windows":
        return f"{base}windows/", f"wazuh_agent_{ver}_windows.wpk"

    arch = _component(query.os_arch, "architecture", unsupported)
    if lower == "darwin":
        if at_least_4_9:
            a = translate_arch(arch, "pkg")
            return f"{base}macos/pkg/{a}/", f"wazuh_agent_{ver}_macos_{a}.pkg.wpk"
        return f"{base}macos/{arch}/pkg/", f"wazuh_agent_{ver}_macos_{arch}.wpk"

    if at_least_4_9:
        if not query.package_type:
            raise UpgradeError(
                unsupported, f"no package type for platform {platform!r} (give package_type)"
            )
        pkg = _component(query.package_type, "package type", unsupported)
        a = translate_arch(arch, pkg)
        return f"{base}linux/{pkg}/{a}/", f"wazuh_agent_{ver}_linux_{a}.{pkg}.wpk"
    if at_least_3_4:
        return f"{base}linux/{arch}/", f"wazuh_agent_{ver}_linux_{arch}.wpk"

    major = _component(query.os_major, "OS major version", unsupported)
    if lower == "ubuntu":
        minor = _component(query.os_minor, "OS minor version", unsupported)
        return (
            f"{base}ubuntu/{major}.{minor}/{arch}/",
            f"wazuh_agent_{ver}_ubuntu_{major}.{minor}_{arch}.wpk",
        )
    return (
        f"{base}{platform}/{major}/{arch}/",
        f"wazuh_agent_{ver}_{platform}_{major}_{arch}.wpk",
    )
