"""After a (re)start, report the last upgrade's result to the manager until it acknowledges.

Reference §7.6, with the fixes of §11.15. ``ResultReporter.run()`` runs once per agent process:

1. with ``upgrade.enabled = false`` it does nothing and upgrades are never allowed;
2. it waits for the first manager connection, then ``result_wait`` (reference: 30 s, time for
   the installer to see the agent connected and write ``var/upgrade/upgrade_result``);
3. no result file -> upgrades are allowed at once; unparseable content -> logged, upgrades
   allowed; an empty file -> re-read for up to ``empty_grace`` more seconds (default:
   ``result_wait``), then reported as a failure "Upgrade failed: empty result file" (the
   reference waited forever and blocked upgrades for good);
4. a result -> ``{"command":"upgrade_update_status","parameters":{error,message,status}}``
   through ``ManagerChannel.send_event``, then a pause of ``wait`` seconds, with ``wait``
   starting at ``notification_wait_start`` and growing ``wait = min(wait * factor, max)``; it
   repeats until the file is gone (the manager sent ``clear_upgrade_result``, which also opens
   the gate and ends the pause at once);
5. when the connection is lost it waits for the next one; a new connection sends at once and
   restarts the backoff from ``notification_wait_start``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from ..errors import WpkUpgradeError
from ..interfaces import ManagerChannel
from .config import AgentConfig
from .result import EMPTY_FILE_OUTCOME, ResultState, UpgradeGate, UpgradeOutcome, read_result

log = logging.getLogger(__name__)

EVENT_COMMAND = "upgrade_update_status"


def status_event(outcome: UpgradeOutcome) -> dict[str, Any]:
    """The event the agent sends about its last upgrade (reference §2.7)."""
    return {"command": EVENT_COMMAND, "parameters": outcome.parameters()}


class ResultReporter:
    """Reports ``upgrade_result`` with backoff; opens ``gate`` when there is nothing to report."""

    def __init__(
        self,
        config: AgentConfig,
        gate: UpgradeGate,
        *,
        send_timeout: float = 30.0,
        empty_grace: float | None = None,
    ) -> None:
        up = config.upgrade
        self.enabled = up.enabled
        self.result_path = config.result_file
        self.result_wait = up.result_wait
        self.wait_start = up.notification_wait_start
        self.wait_max = up.notification_wait_max
        self.factor = up.notification_wait_factor
        self.send_timeout = send_timeout
        self.empty_grace = up.result_wait if empty_grace is None else empty_grace
        self.gate = gate
        self.log = logging.LoggerAdapter(log, {"agent_id": config.agent.id})
        self._channel: ManagerChannel | None = None
        self._connected = asyncio.Event()
        self._generation = 0
        self._wake = asyncio.Event()

    # ---- connection tracking (called by the daemon)
    def connected(self, channel: ManagerChannel) -> None:
        """A manager connection is up; reports go through ``channel`` from now on."""
        self._channel = channel
        self._generation += 1
        self._connected.set()
        self._wake.set()

    def disconnected(self, channel: ManagerChannel | None = None) -> None:
        """The connection (``channel``, or whichever is current) is gone."""
        if channel is None or channel is self._channel:
            self._channel = None
            self._connected.clear()

    # ---- the loop
    async def run(self) -> None:
        """The start-up result check and the reporting loop (returns when done)."""
        if not self.enabled:
            self.log.info("upgrade module disabled: no result check, upgrades not allowed")
            return
        await self._connected.wait()
        self.log.debug("connected; reading the upgrade result in %g s", self.result_wait)
        await asyncio.sleep(self.result_wait)
        empty_deadline = time.monotonic() + self.empty_grace
        wait = self.wait_start
        while not self.gate.allowed:
            read = read_result(self.result_path)
            if read.state is ResultState.MISSING:
                self.log.info("no upgrade result to report; upgrades allowed")
                break
            if read.state is ResultState.INVALID:
                self.log.warning(
                    "ignoring unreadable upgrade result file %s (%r); upgrades allowed",
                    self.result_path,
                    read.text,
                )
                break
            if read.state is ResultState.EMPTY:
                left = empty_deadline - time.monotonic()
                if left > 0:
                    await asyncio.sleep(min(left, max(0.05, min(1.0, self.empty_grace / 10))))
                    continue
                self.log.error(
                    "upgrade result file %s stayed empty; reporting a failure", self.result_path
                )
                outcome = EMPTY_FILE_OUTCOME
            else:
                assert read.outcome is not None
                outcome = read.outcome
            generation = self._generation
            self._wake.clear()
            if not await self._send(outcome):
                await self._connected.wait()
                wait = self.wait_start
                continue
            await self._pause(wait)
            if self._generation != generation:
                wait = self.wait_start
            else:
                wait = min(wait * self.factor, self.wait_max)
        self.gate.allow()

    async def _send(self, outcome: UpgradeOutcome) -> bool:
        """Send one report; False when there is no usable connection (wait for the next)."""
        channel = self._channel
        if channel is None:
            return False
        event = status_event(outcome)
        try:
            answer = await channel.send_event(event, self.send_timeout)
        except (TimeoutError, WpkUpgradeError) as exc:  # before OSError: TimeoutError is one
            self.log.warning("upgrade result report not acknowledged: %s", exc or "timeout")
            return True
        except (ConnectionError, OSError) as exc:
            self.log.warning("could not report the upgrade result: %s; waiting to reconnect", exc)
            self.disconnected(channel)
            return False
        self.log.info(
            "reported upgrade result %d (%s); manager answered %s",
            outcome.error,
            outcome.status,
            answer,
        )
        return True

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if upgrades get allowed or a new connection comes up."""
        waiters = [
            asyncio.ensure_future(self.gate.wait_allowed()),
            asyncio.ensure_future(self._wake.wait()),
        ]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter
