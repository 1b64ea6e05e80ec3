"""The release manifest: its JSON format, a validating parser, and how an agent picks its WPK.

Format 1 (``manifest.json``)::

    {
      "format": 1,
      "releases": [
        {
          "version": "v4.9.1",
          "wpks": [
            {"os": "linux", "package_type": "deb", "arch": "amd64",
             "url": "linux/wazuh_agent_v4.9.1_linux_amd64.deb.wpk",
             "sha1": "<40 hex>", "sha256": "<64 hex>", "size": 5242880},
            {"os": "windows", "url": "https://cdn.example.com/w/agent-4.9.1.wpk",
             "file_name": "wazuh_agent_v4.9.1_windows.wpk", "sha1": "<40 hex>"}
          ]
        }
      ]
    }

* ``os`` is ``windows``, ``macos`` or ``linux``. ``package_type`` and ``arch`` are optional
  (absent: any); ``arch`` uses the names of the official repository (``amd64``/``arm64`` for
  deb, ``intel64``/``arm64`` for macOS, ``x86_64``/``aarch64`` for rpm).
* ``url`` is absolute or relative to the manifest; only http(s), and never plain http when the
  manifest itself came over https. ``file_name`` defaults to the URL's last path segment.
* ``sha1`` is required, ``sha256`` and ``size`` optional; digests compare case-insensitively.
* Releases and WPK entries that break a rule are skipped (and reported), never fatal, as the
  kernel does with bad ``versions`` lines. A document that is not a format-1 manifest at all is
  a ``ManifestError``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from posixpath import basename
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from wpk_upgrade import versions
from wpk_upgrade.layout import translate_arch

FORMAT = 1
OS_NAMES = frozenset({"windows", "macos", "linux"})
_SHA1 = re.compile(r"^[0-9a-fA-F]{40}$")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_+\-][A-Za-z0-9_.+\-]{0,254}$")
_WORD = re.compile(r"^[A-Za-z0-9_.+\-]{1,64}$")


class ManifestError(ValueError):
    """The document is not a usable release manifest."""


@dataclass(frozen=True)
class WpkEntry:
    """One WPK of a release, for one OS (and optionally one package type and architecture)."""

    os: str
    url: str
    file_name: str
    sha1: str
    package_type: str | None = None
    arch: str | None = None
    sha256: str | None = None
    size: int | None = None

    def serves(self, target: AgentTarget) -> bool:
        """True when this WPK is meant for ``target``."""
        return (
            self.os == target.os
            and (self.package_type is None or self.package_type == target.package_type)
            and (self.arch is None or self.arch == target.arch)
        )


@dataclass(frozen=True)
class Release:
    """A version and its WPKs."""

    version: str
    wpks: tuple[WpkEntry, ...]


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest: releases in document order, plus what was skipped and why."""

    releases: tuple[Release, ...]
    skipped: tuple[str, ...] = ()

    def find(self, version: str) -> Release | None:
        """The first release whose version compares equal to ``version``."""
        try:
            versions.parse(version)
        except ValueError:
            return None
        for release in self.releases:
            if versions.compare(release.version, version) == 0:
                return release
        return None

    def latest_for(self, target: AgentTarget) -> Release | None:
        """The newest release with a WPK for ``target`` (the first among equals)."""
        best: Release | None = None
        for release in self.releases:
            if pick(release.wpks, target) is None:
                continue
            if best is None or versions.compare(release.version, best.version) > 0:
                best = release
        return best


@dataclass(frozen=True)
class AgentTarget:
    """What an agent needs: OS family, package type and architecture (repository names)."""

    os: str
    package_type: str | None
    arch: str | None

    def __str__(self) -> str:
        return "/".join(x or "*" for x in (self.os, self.package_type, self.arch))


def agent_target(os_platform: str, os_arch: str | None, package_type: str | None) -> AgentTarget:
    """The manifest key of an agent (reference §5.2-5.3 naming)."""
    platform = (os_platform or "").lower()
    if platform == "windows":
        return AgentTarget("windows", package_type, None)
    if platform == "darwin":
        pkg = package_type or "pkg"
        return AgentTarget("macos", pkg, translate_arch(os_arch, pkg) if os_arch else None)
    arch = translate_arch(os_arch, package_type) if os_arch else None
    return AgentTarget("linux", package_type, arch)


def pick(wpks: Iterable[WpkEntry], target: AgentTarget) -> WpkEntry | None:
    """The first WPK of a release that serves ``target``."""
    for entry in wpks:
        if entry.serves(target):
            return entry
    return None


def parse(data: bytes, manifest_url: str) -> Manifest:
    """Parse a manifest fetched from ``manifest_url`` (relative WPK URLs resolve against it).

    Raises ``ManifestError`` when the document is not JSON or not a format-1 manifest.
    """
    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"not JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("releases"), list):
        raise ManifestError('not a release manifest (no "releases" list)')
    if doc.get("format", FORMAT) != FORMAT:
        raise ManifestError(f"manifest format {doc.get('format')!r} (this plugin reads {FORMAT})")
    secure = urlsplit(manifest_url).scheme.lower() == "https"
    releases: list[Release] = []
    skipped: list[str] = []
    for i, raw in enumerate(doc["releases"]):
        where = f"releases[{i}]"
        version = raw.get("version") if isinstance(raw, dict) else None
        if not isinstance(version, str) or not _parses(version):
            skipped.append(f"{where}: no usable version")
            continue
        raw_wpks = raw.get("wpks")
        if not isinstance(raw_wpks, list):
            skipped.append(f"{where} ({version}): no wpks list")
            continue
        wpks: list[WpkEntry] = []
        for j, item in enumerate(raw_wpks):
            try:
                wpks.append(_entry(item, manifest_url, secure))
            except ValueError as exc:
                skipped.append(f"{where}.wpks[{j}] ({version}): {exc}")
        releases.append(Release(version, tuple(wpks)))
    return Manifest(tuple(releases), tuple(skipped))


def _parses(version: str) -> bool:
    try:
        versions.parse(version)
    except ValueError:
        return False
    return True


def _entry(item: Any, manifest_url: str, secure: bool) -> WpkEntry:
    if not isinstance(item, dict):
        raise ValueError("not an object")
    os_name = item.get("os")
    if os_name not in OS_NAMES:
        raise ValueError(f"os {os_name!r} is not one of {sorted(OS_NAMES)}")
    package_type = _optional_word(item, "package_type")
    arch = _optional_word(item, "arch")
    sha1 = item.get("sha1")
    if not isinstance(sha1, str) or not _SHA1.match(sha1):
        raise ValueError("sha1 must be 40 hexadecimal digits")
    sha256 = item.get("sha256")
    if sha256 is not None and (not isinstance(sha256, str) or not _SHA256.match(sha256)):
        raise ValueError("sha256 must be 64 hexadecimal digits")
    size = item.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise ValueError("size must be a non-negative integer")
    raw_url = item.get("url")
    if not isinstance(raw_url, str) or not raw_url:
        raise ValueError("no url")
    url = urljoin(manifest_url, raw_url)
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"url scheme {scheme!r} is not http(s)")
    if secure and scheme != "https":
        raise ValueError("plain http url in a manifest served over https")
    file_name = item.get("file_name") or unquote(basename(urlsplit(url).path))
    if not isinstance(file_name, str) or not _FILE_NAME.match(file_name) or ".." in file_name:
        raise ValueError(f"unusable file name {file_name!r}")
    return WpkEntry(
        os=os_name,
        url=url,
        file_name=file_name,
        sha1=sha1.lower(),
        package_type=package_type,
        arch=arch,
        sha256=sha256.lower() if sha256 else None,
        size=size,
    )


def _optional_word(item: dict[str, Any], key: str) -> str | None:
    value = item.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not _WORD.match(value):
        raise ValueError(f"{key} {value!r} is not a plain word")
    return value
