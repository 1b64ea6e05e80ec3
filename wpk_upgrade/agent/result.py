"""The agent-side ``upgrade_result`` file and the ``allow_upgrades`` gate (reference §6.5, §7.6).

An installer writes ``var/upgrade/upgrade_result`` after installing and restarting: ``0``
(success), ``1`` (missing dependency) or ``2`` (failure). ``read_result`` reads it and says which
of four states it is in. Parsing is strict (fix of reference §11.15, which searched for the
substrings "0", "1", "2" in that order so that "10" counted as success): of the first 19
characters, the first whitespace-separated token must be exactly ``0``, ``1`` or ``2``.

* ``MISSING``: no file; nothing to report.
* ``EMPTY``: the file exists but holds only whitespace, most likely not written yet. The
  reporter waits for it a bounded time, then reports a failure (the reference waited forever and
  blocked upgrades for good).
* ``INVALID``: anything else; logged, treated as "no result", upgrades are re-enabled.
* ``VALUE``: one of the three outcomes, with the reference's texts.

``UpgradeGate`` is the reference's ``allow_upgrades`` flag, shared by the command handler and
the reporter.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULT_FILE_NAME = "upgrade_result"
READ_CHARS = 19


@dataclass(frozen=True)
class UpgradeOutcome:
    """What the agent reports to the manager about its last upgrade."""

    error: int
    message: str
    status: str

    def parameters(self) -> dict[str, Any]:
        """The ``parameters`` of the ``upgrade_update_status`` event."""
        return {"error": self.error, "message": self.message, "status": self.status}


#: result-file value -> outcome (reference §3.3, ``upgrade_messages[]``).
OUTCOMES: dict[int, UpgradeOutcome] = {
    0: UpgradeOutcome(0, "Upgrade was successful", "Done"),
    1: UpgradeOutcome(1, "Upgrade failed due missing dependency", "Failed"),
    2: UpgradeOutcome(2, "Upgrade failed", "Failed"),
}

#: Reported when the result file stayed empty past the grace period (our addition).
EMPTY_FILE_OUTCOME = UpgradeOutcome(2, "Upgrade failed: empty result file", "Failed")


class ResultState(enum.Enum):
    MISSING = "missing"
    EMPTY = "empty"
    INVALID = "invalid"
    VALUE = "value"


@dataclass(frozen=True)
class ResultRead:
    """One reading of the result file."""

    state: ResultState
    outcome: UpgradeOutcome | None = None
    text: str = ""


def parse_result(text: str) -> ResultRead:
    """Classify the content of a result file (only its first 19 characters count)."""
    head = text[:READ_CHARS]
    tokens = head.split()
    if not tokens:
        return ResultRead(ResultState.EMPTY, text=head)
    if tokens[0] in ("0", "1", "2"):
        return ResultRead(ResultState.VALUE, OUTCOMES[int(tokens[0])], head)
    return ResultRead(ResultState.INVALID, text=head)


def read_result(path: Path) -> ResultRead:
    """Read and classify ``path``; an unreadable file counts as INVALID (text = the reason)."""
    try:
        with path.open("r", encoding="utf-8", errors="replace") as fh:
            text = fh.read(READ_CHARS)
    except FileNotFoundError:
        return ResultRead(ResultState.MISSING)
    except OSError as exc:
        return ResultRead(ResultState.INVALID, text=f"cannot read: {exc.strerror}")
    return parse_result(text)


class UpgradeGate:
    """The reference's ``allow_upgrades``: False until the start-up result check allows it.

    ``wait_allowed()`` lets the reporter wake up as soon as ``clear_upgrade_result`` opens it.
    """

    def __init__(self, allowed: bool = False) -> None:
        self._event = asyncio.Event()
        if allowed:
            self._event.set()

    @property
    def allowed(self) -> bool:
        return self._event.is_set()

    def allow(self) -> None:
        self._event.set()

    def block(self) -> None:
        self._event.clear()

    async def wait_allowed(self) -> None:
        await self._event.wait()
