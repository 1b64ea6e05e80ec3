"""Agent version strings: parsing and comparison as the reference does (reference §4.5).

``Wazuh v4.7.5`` -> ``v4.7.5``; comparison is numeric on major.minor.patch; suffixes such as
``-rc1`` are ignored, so ``v3.0.0-beta7`` equals ``v3.0.0``.
"""

from __future__ import annotations

import re
from functools import lru_cache

_NUMS = re.compile(r"^v?(\d+)(?:\.(\d+))?(?:\.(\d+))?")
_STRICT = re.compile(r"^(?:wazuh )?v?(\d+)\.(\d+)\.(\d+)$", re.IGNORECASE)


def extract(version: str | None) -> str | None:
    """The part of an agent version string from its first ``v`` (None when there is none)."""
    if not version:
        return None
    pos = version.find("v")
    if pos < 0:
        return None
    rest = version[pos:]
    return rest if _NUMS.match(rest) else None


@lru_cache(maxsize=4096)
def parse(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of ``vX.Y.Z`` / ``X.Y.Z``; missing parts are 0.

    Raises ``ValueError`` when the text does not start with a number (after an optional v).
    """
    text = version.strip()
    pos = text.find("v")
    if pos >= 0 and not text[:1].isdigit():
        text = text[pos:]
    m = _NUMS.match(text)
    if not m:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(g) if g else 0 for g in m.groups())  # type: ignore[return-value]


def compare(a: str, b: str) -> int:
    """-1, 0 or 1 as ``a`` is older than, equal to or newer than ``b``."""
    pa, pb = parse(a), parse(b)
    return (pa > pb) - (pa < pb)


def normalise(version: str) -> str:
    """``4.2.1`` / ``Wazuh v4.2.1`` -> ``v4.2.1`` when it is a strict X.Y.Z; else unchanged."""
    m = _STRICT.match(version.strip())
    if not m:
        return version
    return "v{}.{}.{}".format(*m.groups())


def is_valid(version: str) -> bool:
    """True for a strict ``vX.Y.Z`` (optionally ``Wazuh ``-prefixed) version string."""
    return bool(_STRICT.match(version.strip()))
