"""The agent process: config, home layout, transport, local socket, reporter, signals.

``run_agent(config_path)`` is the entry point of ``wpk-upgrade agent --config FILE`` and of
``python -m wpk_upgrade.agent --config FILE``. It is the only place that configures logging
(stderr, plus ``[logging] file`` when set; every line carries the agent id).

``AgentDaemon.run()``:

* creates the home layout, writes ``var/run/agent.pid`` and ``var/run/agent.state``
  (``status=disconnected``; ``status=connected`` once the transport connects);
* serves the local socket ``queue/sockets/upgrade``, runs the result reporter, and runs
  ``Transport.run_agent`` of the driver named in ``[manager] transport`` (stevedore group
  ``wpk_upgrade.transports``). When the driver cannot be loaded or ``run_agent`` fails, the
  failure is logged and retried with backoff while the rest keeps running;
* SIGTERM/SIGINT: clean stop, exit status 0, socket and pid file removed;
* SIGHUP: restart. While a ``lock_restart`` is held (and no installer has run since) the
  restart waits for the lock to expire; it also waits for commands in flight. Then the daemon
  stops cleanly and ``run_agent`` re-executes the process's own command line with ``os.execv``
  (same pid; the version file is re-read). This is how a WPK installer restarts the agent: it
  sends SIGHUP to the pid in ``var/run/agent.pid``. The three signals are blocked whenever no
  handler of ours is installed (start-up, shutdown, across the ``execv``), so they wait instead
  of killing the agent; a stop asked during a restart wins.

Disconnects: the interface has no disconnect callback. ``on_connected`` therefore lives as long
as its connection: the tcp transport runs it as a task and cancels it when the connection ends,
which writes ``status=disconnected``; so do the end of ``run_agent`` and the stop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from ..drivers import TRANSPORTS, driver_class, load_options
from ..errors import ConfigError, WpkUpgradeError
from ..interfaces import ManagerChannel, Transport
from ..logging_setup import configure_logging as configure_process_logging
from ..wpk import remove_stale
from .commands import CA_DISABLED_WARNING, CommandHandler, RestartLock
from .config import AgentConfig, load_agent_config
from .identity import identity_fn
from .local_socket import LocalSocketServer
from .reporter import ResultReporter
from .result import UpgradeGate

log = logging.getLogger(__name__)

RETRY_START = 2.0
RETRY_MAX = 60.0
STOP_TIMEOUT = 10.0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class AgentDaemon:
    """One agent process's long-running parts, wired together (tests drive it directly)."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.gate = UpgradeGate()
        self.restart_lock = RestartLock()
        self.handler = CommandHandler(config, self.gate, self.restart_lock)
        self.reporter = ResultReporter(config, self.gate)
        self.local = LocalSocketServer(
            config.socket_path, self.handler.handle, config.max_message_size
        )
        self.identity = identity_fn(config)
        self.log = logging.LoggerAdapter(log, {"agent_id": config.agent.id})
        self.restart_requested = False
        self.stop_requested = False
        self._stop: asyncio.Event | None = None
        self._restart_task: asyncio.Task[None] | None = None
        self._channel: ManagerChannel | None = None

    # ---- control
    def request_stop(self) -> None:
        """Stop (SIGTERM/SIGINT); wins over a restart requested before."""
        self.log.info("stop requested")
        self.stop_requested = True
        if self._stop is not None:
            self._stop.set()

    @property
    def restarting(self) -> bool:
        """True when ``run()`` ended for a restart (and no stop was asked since)."""
        return self.restart_requested and not self.stop_requested

    def request_restart(self) -> None:
        """Restart (SIGHUP), once any ``lock_restart`` has expired."""
        if self._restart_task is None or self._restart_task.done():
            self._restart_task = asyncio.get_running_loop().create_task(self._restart())

    async def _restart(self) -> None:
        left = self.restart_lock.remaining()
        if left > 0:
            self.log.info("restart requested; deferred up to %.0f s by lock_restart", left)
            await self.restart_lock.wait_released()
        else:
            self.log.info("restart requested")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self.handler.wait_idle(), self.config.upgrade.installer_timeout + 5
            )
        if self.stop_requested:
            return
        self.restart_requested = True
        if self._stop is not None:
            self._stop.set()

    # ---- files
    def prepare(self) -> None:
        """Write the pid and state files, remove what a killed upgrade left beside
        ``var/upgrade``, and warn about the CA settings."""
        _write_atomic(self.config.pid_file, f"{os.getpid()}\n")
        self.set_state(False)
        stale = remove_stale(self.config.upgrade_dir)
        if stale:
            self.log.warning("removed what an interrupted upgrade left: %s", ", ".join(stale))
        stores = self.config.ca_stores
        if stores is None:
            self.log.warning(
                "%s: WPKs are checked against their own certificate only", CA_DISABLED_WARNING
            )
        else:
            for store in stores:
                if not store.exists():
                    self.log.warning("CA store %s does not exist", store)

    def set_state(self, connected: bool) -> None:
        """Write ``var/run/agent.state`` (like the reference's wazuh-agentd.state)."""
        status = "connected" if connected else "disconnected"
        try:
            _write_atomic(self.config.state_file, f"status={status}\n")
        except OSError as exc:
            self.log.warning("cannot write %s: %s", self.config.state_file, exc.strerror)

    # ---- transport
    def load_transport(self) -> Transport:
        """The configured transport driver, with its options validated."""
        manager = self.config.manager
        cls = driver_class(TRANSPORTS, manager.transport)
        transport: Transport = cls(load_options(cls, manager.options, "manager.options"))
        return transport

    async def _on_connected(self, channel: ManagerChannel) -> None:
        """Per connection: state file, reporter; then wait until the transport ends it.

        The transport runs this as a task for the connection's lifetime and cancels it when
        the connection ends (tcp transport); that cancellation is how we learn of a disconnect.
        """
        self.log.info("connected to the manager")
        self._channel = channel
        self.set_state(True)
        self.reporter.connected(channel)
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            self.reporter.disconnected(channel)
            if self._channel is channel:
                self._channel = None
                self.set_state(False)
                self.log.info("disconnected from the manager")

    async def _transport_loop(self, stop: asyncio.Event) -> None:
        delay = RETRY_START
        transport: Transport | None = None
        while not stop.is_set():
            try:
                if transport is None:
                    transport = self.load_transport()
                await transport.run_agent(
                    self.identity, self.handler.handle, self._on_connected, stop
                )
                delay = RETRY_START
            except WpkUpgradeError as exc:
                self.log.error("manager transport %r: %s", self.config.manager.transport, exc)
            except Exception:
                self.log.exception("manager transport %r failed", self.config.manager.transport)
            finally:
                self.set_state(False)
                self.reporter.disconnected()
            if stop.is_set():
                break
            self.log.info("retrying the manager transport in %.0f s", delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, RETRY_MAX)

    # ---- main
    async def run(self) -> int:
        """Run until stopped or restarted; 0 on a clean stop.

        Raises ``WpkUpgradeError`` (touching nothing) when another agent serves this home.
        """
        loop = asyncio.get_running_loop()
        stop = self._stop = asyncio.Event()
        for directory in self.config.layout_dirs():
            directory.mkdir(parents=True, exist_ok=True)
        await self.local.start()
        signals = [signal.SIGTERM, signal.SIGINT]
        entry_mask: set[signal.Signals] | None = None
        try:
            self.prepare()
            for signum in signals:
                loop.add_signal_handler(signum, self.request_stop)
            if hasattr(signal, "SIGHUP"):
                signals.append(signal.SIGHUP)
                loop.add_signal_handler(signal.SIGHUP, self.request_restart)
            entry_mask = set_signal_mask(signal.SIG_UNBLOCK)
            info = self.identity()
            self.log.info(
                "agent %d (%s) version %s starting, pid %d, home %s",
                info.agent_id,
                info.name or "-",
                info.version,
                os.getpid(),
                self.config.home,
            )
            tasks = [
                asyncio.create_task(self._transport_loop(stop), name="transport"),
                asyncio.create_task(self.reporter.run(), name="reporter"),
            ]
            await stop.wait()
            await self._shutdown(tasks)
        finally:
            await self.local.close()
            self.handler.close_all()
            self.set_state(False)
            if entry_mask is not None:
                # back as we found it: blocked under run_agent, so that a signal arriving from
                # here to the re-executed process's handlers waits instead of killing us
                set_signal_mask(signal.SIG_SETMASK, entry_mask)
            for signum in signals:
                loop.remove_signal_handler(signum)
            if not self.restarting:
                with contextlib.suppress(FileNotFoundError):
                    self.config.pid_file.unlink()
        self.log.info("agent %s", "restarting" if self.restarting else "stopped")
        return 0

    async def _shutdown(self, tasks: list[asyncio.Task[Any]]) -> None:
        transport, reporter = tasks
        reporter.cancel()
        try:
            await asyncio.wait_for(transport, STOP_TIMEOUT)
        except TimeoutError:
            self.log.warning("transport did not stop within %.0f s; cancelled", STOP_TIMEOUT)
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
        if self._restart_task is not None and not self._restart_task.done():
            self._restart_task.cancel()


# --------------------------------------------------------------------------- entry points


class _AgentIdFilter(logging.Filter):
    def __init__(self, agent_id: int) -> None:
        super().__init__()
        self.agent_id = agent_id

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "agent_id"):
            record.agent_id = self.agent_id
        return True


AGENT_TEXT_LAYOUT = (
    "%(asctime)s wpk-agent[%(process)d] agent=%(agent_id)s %(levelname)s %(name)s: %(message)s"
)


def configure_logging(config: AgentConfig) -> None:
    """stderr (and the optional log file) from ``[logging]``, the agent id on every line:
    ``text`` lines name it (``agent=5``), ``json`` objects carry it as ``agent_id``."""
    section = config.logging
    configure_process_logging(
        level=section.level,
        fmt=section.format,
        file=config.log_file,
        text_layout=AGENT_TEXT_LAYOUT,
        record_filter=_AgentIdFilter(config.agent.id),
    )


#: The signals the daemon handles; blocked whenever no handler of ours is installed.
HANDLED_SIGNALS = frozenset(
    sig for sig in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)) if sig
)


def set_signal_mask(how: int, signals: Any = HANDLED_SIGNALS) -> set[signal.Signals]:
    """``pthread_sigmask`` where it exists; returns the previous mask (empty elsewhere).

    A blocked signal stays pending, and the mask and pending signals survive ``execv``: a
    SIGHUP or SIGTERM that arrives while no handler is installed (start-up, shutdown, the
    re-exec) is delivered once the handlers are back instead of killing the agent.
    """
    if not hasattr(signal, "pthread_sigmask"):
        return set()
    return signal.pthread_sigmask(how, signals)


def _reexec() -> None:
    """Replace this process with a fresh run of its own command line (same pid)."""
    argv = [sys.executable, *sys.orig_argv[1:]]
    logging.shutdown()
    os.execv(sys.executable, argv)


def run_agent(config_path: str | os.PathLike[str], *, setup_logging: bool = True) -> int:
    """Run the agent until stopped (exit status) or restarted (re-exec, does not return)."""
    entry_mask = set_signal_mask(signal.SIG_BLOCK)  # until the daemon's handlers are in place
    try:
        try:
            config = load_agent_config(config_path)
        except ConfigError as exc:
            print(f"wpk-upgrade agent: {exc}", file=sys.stderr)
            return 2
        daemon = AgentDaemon(config)
        try:
            daemon.load_transport().check("agent")
        except ConfigError as exc:
            print(f"wpk-upgrade agent: {config_path}: {exc}", file=sys.stderr)
            return 2
        if setup_logging:
            configure_logging(config)
        try:
            code = asyncio.run(daemon.run())
        except WpkUpgradeError as exc:
            log.error("%s", exc, extra={"agent_id": config.agent.id})
            return 1
        if daemon.restarting:
            _reexec()
        return code
    finally:
        set_signal_mask(signal.SIG_SETMASK, entry_mask)


def main(argv: list[str] | None = None) -> int:
    """``python -m wpk_upgrade.agent --config FILE``."""
    parser = argparse.ArgumentParser(
        prog="python -m wpk_upgrade.agent", description="Run the wpk-upgrade agent."
    )
    parser.add_argument("--config", required=True, help="agent TOML configuration file")
    args = parser.parse_args(argv)
    return run_agent(args.config)
