"""The dispatcher: runs this node's upgrade tasks with at most ``max_threads`` at once.

Each task: Pending -> In progress (same node), resolve the WPK through its source and the
cache, push it to the agent, then leave it In progress until the agent reports (or Legacy for
an explicit target below v4.1.0). Any failure ends the task Failed with the reference text in
``error_msg`` and our precise reason in the history (reference §1.2 step 4).

Where work comes from: the local intake queues the tasks it created for this node; a poller
claims (``TaskStore.claim_pending``, atomic across nodes) this node's Pending tasks that
another node's intake created, or that a previous run left, whenever slots are idle; restart
recovery queues In progress tasks whose push was cut (``resume``). Just before the
``upgrade`` command the task's installer phase is recorded, so a restart never pushes a task
whose installer may have started: that one waits for its report or its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from pathlib import Path
from typing import NamedTuple

import pluggy

from . import layout
from .cache import WpkCache
from .config import ManagerConfig
from .errors import UpgradeCode, UpgradeError, WpkUpgradeError
from .hub import AgentRegistry
from .interfaces import PHASE_INSTALLING, TaskStore, WpkQuery, WpkSource
from .layout import V4_9
from .models import AgentInfo, Task, TaskParams, TaskStatus, WpkRef
from .plugin_manager import notify
from .sources import SourceRegistry
from .taskmanager import TaskManager
from .transfer import ChunkBudget, TransferSettings, WpkPusher

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 1.0
#: Second directory probed when explaining a missing default target (pre-v4.9.0 layout).
V4_8 = "v4.8.0"


class Job(NamedTuple):
    """A queued task: Pending (moved to In progress when it starts) or ``claimed`` (already
    In progress on this node: claimed by the poller, or resumed after a restart)."""

    task_id: int
    claimed: bool = False


class Dispatcher:
    """Queue of jobs, the poller that claims this node's other Pending tasks, and the
    bounded pool that runs them."""

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
        # Jobs already In progress (claimed, resumed) go before Pending ones: their timeout
        # runs. Entries are (priority, sequence, job): FIFO within a priority.
        self.queue: asyncio.PriorityQueue[tuple[int, int, Job]] = asyncio.PriorityQueue()
        self._sequence = itertools.count()
        self._poll_now = asyncio.Event()
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
            not_ready_wait=config.upgrade.not_ready_wait,
        )
        #: chunks read and not yet answered, over all of this node's windowed pushes
        self.chunk_budget = ChunkBudget(int(config.upgrade.max_inflight_mb * (1 << 20)))

    def submit(self, task_id: int) -> None:
        """Queue a Pending task of this node."""
        self._put(Job(task_id))

    def resume(self, task_id: int) -> None:
        """Queue an In progress task of this node whose push was cut (restart recovery):
        it is pushed again without the Pending -> In progress step."""
        self._put(Job(task_id, claimed=True))

    def _put(self, job: Job) -> None:
        self.queue.put_nowait((0 if job.claimed else 1, next(self._sequence), job))

    async def run(self, stop: asyncio.Event) -> None:
        """Consume the queue until ``stop``; each task runs in its own asyncio task."""
        self._stop = stop
        poller = asyncio.create_task(self._poll(stop))
        try:
            await self._consume(stop)
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller

    async def _poll(self, stop: asyncio.Event) -> None:
        """Claim this node's Pending tasks nobody queued here (created by another node's
        intake, or left by a previous run) whenever the queue is empty and slots are idle;
        every ``poll_interval`` seconds, and at once when a slot frees."""
        interval = self.config.task_manager.poll_interval
        node = self.config.node_name
        while not stop.is_set():
            self._poll_now.clear()
            free = self.config.upgrade.max_threads - len(self.running)
            if free > 0 and self.queue.empty():
                # Agents still being pushed to (a timed-out or cancelled task's push) keep
                # their new task In queue, so its timeout does not start (D7).
                busy = [agent for agent, lock in self._pushing.items() if lock.locked()]
                try:
                    for task in await self.tasks.claim(node, free, busy):
                        self._put(Job(task.task_id, claimed=True))
                except Exception as exc:  # noqa: BLE001 - the store may be down: retry later
                    log.warning("dispatcher: cannot claim pending tasks: %s", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._poll_now.wait()

    async def _consume(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            getter = asyncio.ensure_future(self.queue.get())
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                stopper.cancel()
                break
            stopper.cancel()
            _, _, item = getter.result()
            await self.slots.acquire()
            job = asyncio.create_task(self._guarded(item))
            self.running.add(job)
            job.add_done_callback(self.running.discard)
        for job in list(self.running):
            job.cancel()
        if self.running:
            await asyncio.gather(*self.running, return_exceptions=True)
        if self._writes:  # progress records still being written: the store closes next
            await asyncio.wait(set(self._writes))

    async def _guarded(self, job: Job) -> None:
        try:
            await self.run_task(job.task_id, job.claimed)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("task %d: unexpected failure", job.task_id)
        finally:
            self.slots.release()
            self._poll_now.set()

    async def run_task(self, task_id: int, claimed: bool = False) -> None:
        """Run one task to its outcome: a Pending one, or (``claimed``) one already In
        progress on this node."""
        task = await asyncio.to_thread(self.store.get_task, task_id)
        wanted = TaskStatus.IN_PROGRESS if claimed else TaskStatus.PENDING
        if task is None or task.status is not wanted:
            return
        if claimed and task.node != self.config.node_name:
            return
        # One push at a time per agent: a task that timed out (or was cancelled) may still be
        # pushing when a new task of the same agent starts (the agent has one open file). The
        # new one stays In queue meanwhile, so its timeout does not run (D7).
        async with self._pushing.setdefault(task.agent_id, asyncio.Lock()):
            await self._run_task(task, claimed)

    async def _run_task(self, task: Task, claimed: bool = False) -> None:
        task_id = task.task_id
        params = await asyncio.to_thread(self.store.task_params, task_id) or TaskParams(
            command=task.command
        )
        if claimed:
            fresh = await asyncio.to_thread(self.store.get_task, task_id)
            if fresh is None or fresh.status is not TaskStatus.IN_PROGRESS:
                log.info("task %d (agent %03d) no longer running; skipped", task_id, task.agent_id)
                return
            task = fresh
        else:
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
                budget=self.chunk_budget,
            )
            log.info("task %d: sending %s to agent %03d", task_id, wpk.file_name, task.agent_id)
            await pusher.push(wpk)
        except UpgradeError as exc:
            if self._stopping():
                # Our own shutdown broke the agent connection: the task stays In progress;
                # the next start pushes it again unless its installer phase was recorded.
                log.info(
                    "task %d (agent %03d) interrupted by shutdown: %s", task_id, task.agent_id, exc
                )
                return
            if await self.tasks.set_status(task, TaskStatus.FAILED, None, exc.text, exc.detail):
                log.warning("task %d (agent %03d) failed: %s", task_id, task.agent_id, exc)
            else:  # cancelled (then ``upgrade`` was not sent) or timed out meanwhile
                log.info(
                    "task %d (agent %03d) no longer running; push stopped: %s",
                    task_id,
                    task.agent_id,
                    exc,
                )
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
        """Just before the ``upgrade`` command: True while the task is In progress, and then
        its installer phase is recorded (atomically), so a restart will not push it again."""
        return await asyncio.to_thread(self.store.record_phase, task_id, PHASE_INSTALLING)

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

        order = [0, 0]  # writes issued, newest write done (they run in worker threads)
        lock = threading.Lock()

        def store_progress(number: int, sent: int, total: int) -> None:
            with lock:
                if number > order[1]:  # an older value never overwrites a newer one
                    order[1] = number
                    self.store.set_progress(task.task_id, sent, total)

        def write_progress(sent: int, total: int) -> None:
            last[0] = time.monotonic()
            order[0] += 1
            write = loop.run_in_executor(None, store_progress, order[0], sent, total)
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
            candidate = await self.sources.call(source.resolve_path, params.file_path)  # type: ignore[attr-defined]
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
            await self.sources.call(self._no_target, source, query)
        # on the sources' own threads: a slow repository never starves the store (R6)
        candidate = await self.sources.call(source.resolve, query)
        ref = await self.sources.call(self.cache.obtain, source, candidate)
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
