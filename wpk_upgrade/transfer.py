"""Pushing a WPK to one agent with the reference command sequence (reference §7.1-7.3).

``lock_restart`` (always the legacy ``com`` form), ``open`` (retried), ``write`` per chunk,
``close``, ``sha1`` (compared case-insensitively, a reference bug fixed), then ``upgrade``.
Agents at v4.1.0 or later get the JSON commands of target ``upgrade``; older agents the legacy
text commands of target ``com`` (raw chunk bytes carried as latin-1 text). Each failing step
raises ``UpgradeError`` with the reference code (18 to 23) and a precise detail.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from . import versions
from .errors import UpgradeCode, UpgradeError
from .interfaces import AgentLink
from .models import WpkRef

log = logging.getLogger(__name__)

JSON_PROTOCOL_SINCE = "v4.1.0"


@dataclass(frozen=True)
class TransferSettings:
    """Knobs of one push."""

    chunk_size: int = 32768
    command_timeout: float = 60.0
    installer_timeout: float = 600.0
    open_attempts: int = 10
    open_retry_delay: float = 1.0


@dataclass(frozen=True)
class Reply:
    """An agent's answer reduced to success and data (reference C067)."""

    ok: bool
    data: str


def parse_json_reply(text: str) -> Reply:
    """``{"error":0,"message":M}`` -> ok with data M; anything else is a failure."""
    try:
        obj = json.loads(text)
    except ValueError:
        return Reply(False, text)
    if not isinstance(obj, dict) or not isinstance(obj.get("error"), int):
        return Reply(False, "Unknown error from agent.")
    message = obj.get("message")
    data = message if isinstance(message, str) else ""
    return Reply(obj["error"] == 0, data)


def parse_legacy_reply(text: str) -> Reply:
    """``ok <data>`` is a success; the data is the text after the first space."""
    if text.startswith("ok"):
        return Reply(True, text[3:] if len(text) > 2 else "")
    return Reply(False, text[4:] if text.startswith("err ") else text)


def uses_json(agent_version: str | None) -> bool:
    """True when the agent speaks the JSON command set (its current version >= v4.1.0)."""
    current = versions.extract(agent_version)
    if current is None:
        return True
    return versions.compare(current, JSON_PROTOCOL_SINCE) >= 0


def _json_command(command: str, **parameters: Any) -> str:
    return json.dumps({"command": command, "parameters": parameters}, separators=(",", ":"))


class WpkPusher:
    """Runs the command sequence over one ``AgentLink``."""

    def __init__(
        self,
        link: AgentLink,
        agent_version: str | None,
        settings: TransferSettings,
        progress: Callable[[int, int], None] | None = None,
        before_install: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.link = link
        self.json = uses_json(agent_version)
        self.settings = settings
        self.progress = progress
        self.before_install = before_install

    async def _send(
        self, target: str, payload: str, code: UpgradeCode, timeout: float | None = None
    ) -> Reply:
        try:
            text = await self.link.request(
                target, payload, timeout or self.settings.command_timeout
            )
        except TimeoutError as exc:
            raise UpgradeError(code, "no answer from the agent in time") from exc
        except (ConnectionError, OSError) as exc:
            raise UpgradeError(code, f"agent connection lost: {exc}") from exc
        reply = parse_json_reply(text) if target == "upgrade" else parse_legacy_reply(text)
        return reply

    async def _command(
        self,
        code: UpgradeCode,
        json_cmd: str,
        legacy: str,
        timeout: float | None = None,
        **params: Any,
    ) -> Reply:
        if self.json:
            return await self._send("upgrade", _json_command(json_cmd, **params), code, timeout)
        return await self._send("com", legacy, code, timeout)

    async def push(self, wpk: WpkRef) -> str:
        """Deliver and install ``wpk``; returns the installer's exit status text ("0")."""
        name = wpk.file_name
        lock = await self._send("com", "lock_restart -1", UpgradeCode.SEND_LOCK_RESTART_ERROR)
        if not lock.ok:
            raise UpgradeError(UpgradeCode.SEND_LOCK_RESTART_ERROR, f"agent said: {lock.data}")

        last = ""
        for attempt in range(1, self.settings.open_attempts + 1):
            reply = await self._command(
                UpgradeCode.SEND_OPEN_ERROR, "open", f"open wb {name}", mode="wb", file=name
            )
            if reply.ok:
                break
            last = reply.data
            log.debug("open attempt %d of %s failed: %s", attempt, name, last)
            # The reference retries back to back; an agent that just restarted refuses
            # commands until its start-up result check is over, so we wait a little.
            if attempt < self.settings.open_attempts:
                await asyncio.sleep(self.settings.open_retry_delay)
        else:
            raise UpgradeError(
                UpgradeCode.SEND_OPEN_ERROR,
                f"{self.settings.open_attempts} attempts, last answer: {last}",
            )

        total = wpk.size
        sent = 0
        with open(wpk.path, "rb") as fh:
            while chunk := fh.read(self.settings.chunk_size):
                if self.json:
                    reply = await self._send(
                        "upgrade",
                        _json_command(
                            "write",
                            buffer=base64.b64encode(chunk).decode(),
                            length=len(chunk),
                            file=name,
                        ),
                        UpgradeCode.SEND_WRITE_ERROR,
                    )
                else:
                    reply = await self._send(
                        "com",
                        f"write {len(chunk)} {name} " + chunk.decode("latin-1"),
                        UpgradeCode.SEND_WRITE_ERROR,
                    )
                if not reply.ok:
                    raise UpgradeError(
                        UpgradeCode.SEND_WRITE_ERROR, f"at byte {sent}: agent said: {reply.data}"
                    )
                sent += len(chunk)
                if self.progress:
                    self.progress(sent, total)

        reply = await self._command(
            UpgradeCode.SEND_CLOSE_ERROR, "close", f"close {name}", file=name
        )
        if not reply.ok:
            raise UpgradeError(UpgradeCode.SEND_CLOSE_ERROR, f"agent said: {reply.data}")

        reply = await self._command(UpgradeCode.SEND_SHA1_ERROR, "sha1", f"sha1 {name}", file=name)
        if not reply.ok:
            raise UpgradeError(UpgradeCode.SEND_SHA1_ERROR, f"agent said: {reply.data}")
        if reply.data.strip().lower() != wpk.sha1.strip().lower():
            raise UpgradeError(
                UpgradeCode.SEND_SHA1_ERROR,
                f"The SHA1 of the file doesn't match in the agent: expected {wpk.sha1}, "
                f"agent has {reply.data}",
            )

        if self.before_install is not None and not await self.before_install():
            raise UpgradeError(UpgradeCode.SEND_UPGRADE_ERROR, "task cancelled before install")

        # Wait longer than the agent's installer timeout (reference §11.12 fixed).
        timeout = self.settings.installer_timeout + self.settings.command_timeout
        reply = await self._command(
            UpgradeCode.SEND_UPGRADE_ERROR,
            "upgrade",
            f"upgrade {name} {wpk.installer}",
            timeout=timeout,
            file=name,
            installer=wpk.installer,
        )
        if not reply.ok:
            raise UpgradeError(UpgradeCode.SEND_UPGRADE_ERROR, f"agent said: {reply.data}")
        status = reply.data.strip().split(" ", 1)[0] if reply.data.strip() else ""
        if status != "0":
            raise UpgradeError(
                UpgradeCode.SEND_UPGRADE_ERROR,
                f"Script execution failed in the agent: installer exit status {reply.data!r}",
            )
        return status
