"""The repository ``versions`` file: a tolerant parser, lookup and formatting (reference §5.4).

Format: one entry per line, ``<version> <sha1> [<sha256>]``. Decision D5 makes the parser
tolerant where the reference is not: CRLF or CR line ends, tabs or several spaces between
fields, blank lines, ``#`` comments (whole-line or trailing) and trailing spaces are accepted;
digests are normalised to lowercase so they compare case-insensitively (reference §11 item 6).
The optional third column, a 64-hex-digit SHA-256, is our extension; a third field of any
other shape is ignored. Lines that cannot be an entry (one field, a version that does not
parse, a SHA1 that is not hexadecimal) are skipped, never fatal: ``parse`` does not raise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from . import versions

#: Largest ``versions`` body read (reference ``WM_UPGRADE_MAX_RESPONSE_SIZE``).
MAX_VERSIONS_SIZE = 1024 * 1024

_HEX = re.compile(r"^[0-9a-fA-F]{1,128}$")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_LINES = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class VersionEntry:
    """One line of a ``versions`` file; digests are lowercase."""

    version: str
    sha1: str
    sha256: str | None = None


def parse(text: str) -> list[VersionEntry]:
    """Every usable entry of ``text``, in file order. Never raises."""
    entries: list[VersionEntry] = []
    if text.startswith("\ufeff"):
        text = text[1:]
    for raw in _LINES.split(text):
        line = raw.split("#", 1)[0]
        fields = line.split()
        if len(fields) < 2:
            continue
        version, sha1 = fields[0], fields[1]
        if not _HEX.match(sha1):
            continue
        try:
            versions.parse(version)
        except ValueError:
            continue
        sha256 = fields[2].lower() if len(fields) > 2 and _SHA256.match(fields[2]) else None
        entries.append(VersionEntry(version, sha1.lower(), sha256))
    return entries


def find(entries: Iterable[VersionEntry], target: str) -> VersionEntry | None:
    """The first entry whose version compares equal to ``target`` (reference §5.4), or None."""
    try:
        versions.parse(target)
    except ValueError:
        return None
    for entry in entries:
        if versions.compare(entry.version, target) == 0:
            return entry
    return None


def latest(entries: Iterable[VersionEntry]) -> VersionEntry | None:
    """The entry with the highest version (decision D1); the first one among equals."""
    best: VersionEntry | None = None
    for entry in entries:
        if best is None or versions.compare(entry.version, best.version) > 0:
            best = entry
    return best


def format_entries(entries: Iterable[VersionEntry], newline: str = "\n") -> str:
    """A ``versions`` file body for ``entries`` (SHA-256 in a third column when known)."""
    lines = []
    for e in entries:
        lines.append(f"{e.version} {e.sha1}" + (f" {e.sha256}" if e.sha256 else ""))
    return "".join(line + newline for line in lines)
