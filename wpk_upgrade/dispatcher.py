"""The dispatcher: runs queued upgrade tasks with at most ``max_threads`` at once.

Each task: Pending -> In progress (same node), resolve the WPK through its source and the
cache, push it to the agent, then leave it In progress until the agent reports (or Legacy for
an explicit target below v4.1.0). Any failure ends the task Failed with the reference text in
``error_msg`` and our precise reason in the history (reference §1.2 step 4).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path

import pluggy

from . import layout
from .cache import WpkCache
from .config import ManagerConfig
from .errors import UpgradeCode, UpgradeError, WpkUpgradeError
from .hub import AgentRegistry
from .interfaces import TaskStore, WpkQuery, WpkSource
from .layout import V4_9
from .models import AgentInfo, Task, TaskParams, TaskStatus, WpkRef
from .plugin_manager import notify
from .sources import SourceRegistry
from .taskmanager import TaskManager
from .transfer import TransferSettings, WpkPusher

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 1.0
#: Second directory probed when explaining a missing default target (pre-v4.9.0 layout).
V4_8 = "v4.8.0"


class Dispatcher:
    """Queue of task ids and the bounded pool that runs them."""

    def __init__(
        self,
        config: ManagerConfig,
        store: TaskStore,
        tasks: TaskManager,
        sources: SourceRegistry,
        cache: WpkCache,
        hub: AgentRegistry,
        pm: pluggy.PluginManager,
    ) -> None:
        self.config = config
        self.store = store
        self.tasks = tasks
        self.sources = sources
        self.cache = cache
        self.hub = hub
        self.pm = pm
        self.queue: asyncio.Queue[int] = asyncio.Queue()
        self.slots = asyncio.Semaphore(config.upgrade.max_threads)
        self.running: set[asyncio.Task[None]] = set()
        self.running_aux: set[asyncio.Task[None]] = set()
        self._stop: asyncio.Event | None = None
        self._pushing: dict[int, asyncio.Lock] = {}
        self._writes: set[asyncio.Future[None]] = set()
        self.settings = TransferSettings(
            chunk_size=config.upgrade.chunk_size,
            command_timeout=config.upgrade.command_timeout,
            installer_timeout=config.upgrade.installer_timeout,
            open_attempts=config.upgrade.open_attempts,
            open_retry_delay=config.upgrade.open_retry_delay,
            mode=config.upgrade.transfer_mode,
            window=config.upgrade.window,
            resume_timeout=config.upgrade.resume_timeout,
            resume_attempts=config.upgrade.resume_attempts,
        )

    def submit(self, task_id: int) -> None:
        """Queue a task (its status must be Pending)."""
        self.queue.put_nowait(task_id)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume the queue until ``stop``; each task runs in its own asyncio task."""
        self._stop = stop
        while not stop.is_set():
            getter = asyncio.ensure_future(self.queue.get())
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                stopper.cancel()
                break
            stopper.cancel()
            task_id = getter.result()
            await self.slots.acquire()
            job = asyncio.create_task(self._guarded(task_id))
            self.running.add(job)
            job.add_done_callback(self.running.discard)
        for job in list(self.running):
            job.cancel()
        if self.running:
            await asyncio.gather(*self.running, return_exceptions=True)
        if self._writes:  # progress records still being written: the store closes next
            await asyncio.wait(set(self._writes))

    async def _guarded(self, task_id: int) -> None:
        try:
            await self.run_task(task_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("task %d: unexpected failure", task_id)
        finally:
            self.slots.release()

    async def run_task(self, task_id: int) -> None:
        """Run one task from Pending to its outcome."""
        task = await asyncio.to_thread(self.store.get_task, task_id)
        if task is None or task.status is not TaskStatus.PENDING:
            return
        # One push at a time per agent: a task that timed out (or was cancelled) may still be
        # pushing when a new task of the same agent starts (the agent has one open file). The
        # new one stays In queue meanwhile, so its timeout does not run (D7).
        async with self._pushing.setdefault(task.agent_id, asyncio.Lock()):
            await self._run_task(task)

    async def _run_task(self, task: Task) -> None:
        task_id = task.task_id
        params = await asyncio.to_thread(self.store.task_params, task_id) or TaskParams(
            command=task.command
        )
        if not await self.tasks.set_status(
            task, TaskStatus.IN_PROGRESS, self.config.node_name, reason="dispatched"
        ):
            log.info("task %d (agent %03d) no longer pending; skipped", task_id, task.agent_id)
            return
        task = await asyncio.to_thread(self.store.get_task, task_id) or task
        try:
            agent = await asyncio.to_thread(self.store.get_agent, task.agent_id)
            if agent is None:
                raise UpgradeError(UpgradeCode.GLOBAL_DB_FAILURE, "agent no longer known")
            wpk = await self.resolve(task, params, agent)
            # After a manager restart, resumed tasks start before their agents reconnect.
            link = await self.hub.wait_link(task.agent_id, self.settings.command_timeout)
            if link is None:
                raise UpgradeError(UpgradeCode.SEND_LOCK_RESTART_ERROR, "agent is not connected")
            pusher = WpkPusher(
                link,
                agent.version,
                self.settings,
                progress=self._progress_recorder(task),
                before_install=lambda: self._still_running(task_id),
                # a lost connection: wait for the agent's next one, then resume the transfer
                reconnect=lambda old: self.hub.wait_link(
                    task.agent_id, self.settings.resume_timeout, not_link=old
                ),
                task_id=task_id,
            )
            log.info("task %d: sending %s to agent %03d", task_id, wpk.file_name, task.agent_id)
            await pusher.push(wpk)
        except UpgradeError as exc:
            if self._stopping():
                # Our own shutdown broke the agent connection: like the reference, a restart
                # leaves an In progress task alone (the agent may still report, or it times out).
                log.info(
                    "task %d (agent %03d) interrupted by shutdown: %s", task_id, task.agent_id, exc
                )
                return
            log.warning("task %d (agent %03d) failed: %s", task_id, task.agent_id, exc)
            await self.tasks.set_status(task, TaskStatus.FAILED, None, exc.text, exc.detail)
            return
        except WpkUpgradeError as exc:
            log.warning("task %d (agent %03d) failed: %s", task_id, task.agent_id, exc)
            await self.tasks.set_status(
                task,
                TaskStatus.FAILED,
                None,
                UpgradeError(UpgradeCode.UNKNOWN_ERROR).text,
                str(exc),
            )
            return
        if params.legacy_target:
            await self.tasks.set_status(
                task, TaskStatus.LEGACY, self.config.node_name, reason="legacy target installed"
            )
        else:
            log.info(
                "task %d: installer started on agent %03d; waiting for its report",
                task_id,
                task.agent_id,
            )

    def _stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    async def _still_running(self, task_id: int) -> bool:
        task = await asyncio.to_thread(self.store.get_task, task_id)
        return task is not None and task.status is TaskStatus.IN_PROGRESS

    def _progress_recorder(self, task: Task):  # type: ignore[no-untyped-def]
        """``record(sent, total)``: acknowledged bytes, written at most once per
        ``PROGRESS_INTERVAL``; a skipped value is written when the interval ends (so a stalled
        or resumed transfer shows where it really is), the final one at once."""
        last = [0.0]
        latest: list[tuple[int, int]] = []
        timer: list[asyncio.TimerHandle] = []
        loop = asyncio.get_running_loop()

        def flush() -> None:
            timer.clear()
            if latest and not self._stopping():
                write_progress(*latest.pop())

        def record(sent: int, total: int) -> None:
            t = time.monotonic()
            latest[:] = [(sent, total)]
            if sent < total and t - last[0] < PROGRESS_INTERVAL:
                if not timer:
                    timer.append(loop.call_later(PROGRESS_INTERVAL - (t - last[0]), flush))
                return
            if timer:
                timer.pop().cancel()
            latest.clear()
            write_progress(sent, total)

        def write_progress(sent: int, total: int) -> None:
            last[0] = time.monotonic()
            write = loop.run_in_executor(None, self.store.set_progress, task.task_id, sent, total)
            self._writes.add(write)
            write.add_done_callback(self._writes.discard)
            notify(
                self.pm,
                "wpk_transfer_progress",
                task_id=task.task_id,
                agent_id=task.agent_id,
                sent=sent,
                total=total,
            )

        return record

    async def resolve(self, task: Task, params: TaskParams, agent: AgentInfo) -> WpkRef:
        """Locate, fetch and check the WPK of a task (errors 9, 14-17)."""
        platform = (agent.os_platform or "").lower()
        if params.command == "upgrade_custom":
            if not params.file_path:
                raise UpgradeError(UpgradeCode.WPK_FILE_DOES_NOT_EXIST, "no file_path")
            source = self.sources.custom()
            candidate = await asyncio.to_thread(source.resolve_path, params.file_path)  # type: ignore[attr-defined]
            installer = params.installer or layout.default_installer(platform)
            return WpkRef(
                path=str(Path(params.file_path)),
                file_name=candidate.file_name,
                sha1=candidate.sha1 or "",
                sha256=candidate.sha256,
                size=candidate.size or Path(params.file_path).stat().st_size,
                installer=installer,
            )
        target = params.version
        repo = params.wpk_repo or self.config.upgrade.wpk_repository
        if not target and not repo:
            raise UpgradeError(
                UpgradeCode.WPK_VERSION_DOES_NOT_EXIST,
                "no version requested and none could be determined (configure wpk_repository "
                "or manager_version)",
            )
        base = layout.base_url(
            params.wpk_repo, self.config.upgrade.wpk_repository, target or V4_9, params.use_http
        )
        package_type = layout.package_type(platform, params.package_type, params.force_upgrade)
        query = WpkQuery(
            base_url=base,
            version=target or V4_9,
            os_platform=platform,
            os_major=agent.os_major,
            os_minor=agent.os_minor,
            os_arch=agent.os_arch,
            package_type=package_type,
            agent_id=agent.agent_id,
        )
        source = self.sources.for_url(base)
        if not target:
            # D1: the repository could not tell the latest version at request time.
            await asyncio.to_thread(self._no_target, source, query)
        candidate = await asyncio.to_thread(source.resolve, query)
        ref = await asyncio.to_thread(self.cache.obtain, source, candidate)
        return WpkRef(
            path=ref.path,
            file_name=ref.file_name,
            sha1=ref.sha1,
            sha256=ref.sha256,
            size=ref.size,
            installer=layout.default_installer(platform),
        )

    @staticmethod
    def _no_target(source: WpkSource, query: WpkQuery) -> None:
        """Why no default target (D1) was found at request time: error 14 when the
        repository cannot be read for this platform, else 15. Always raises."""
        unreachable: UpgradeError | None = None
        for probe in (V4_9, V4_8):
            try:
                source.resolve(dataclasses.replace(query, version=probe))
            except UpgradeError as exc:
                if exc.code != UpgradeCode.URL_NOT_FOUND:
                    break
                unreachable = exc
            else:
                break
        else:
            assert unreachable is not None
            raise UpgradeError(unreachable.code, unreachable.detail)
        raise UpgradeError(
            UpgradeCode.WPK_VERSION_DOES_NOT_EXIST,
            "no version requested, and the repository offered none for this platform when the "
            "request was made",
        )
