"""A slot: a durable queue owned by the supervisor, served by one worker incarnation at a time.

The queue lives here, in the supervisor, for the life of the daemon. Each incarnation gets a
pipe of its own, so a process killed at any instant (idle in recv, mid-decode, mid-send) takes
nothing shared down with it (docs/design.md#queues-wedged-by-a-killed-process). The slot sends one segment at a time, so it always
knows which tasks have a partial result in the worker: exactly those fail when it dies.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import psutil
import structlog

from capsd.segment import Segment
from capsd.supervisor.queue import SegmentQueue, Waiting
from capsd.supervisor.task import Task
from capsd.worker import main as worker
from capsd.worker.main import Decoded, Ready, WorkerSpec

log = structlog.get_logger("capsd.slot")

# spawn, not fork: the supervisor runs an event loop and threads (docs/design.md#fork-with-a-running-loop).
_mp = multiprocessing.get_context("spawn")

# Why an incarnation ended -> the error code for the tasks that lived in it.
EXIT_CODES = {
    "crashed": "worker_crashed",
    "hung": "worker_hung",
    "requested": "worker_restarted",
    "rss": "worker_restarted",
}
PLANNED = {"requested", "rss"}  # graceful recycles: not counted against restart intensity
DRAIN_TIMEOUT_S = 30.0  # a graceful recycle waits this long for the tasks in its worker, then forces
# A replacement that cannot be spawned (no descriptors, no memory) is tried again after
# 0.5, 1, 2 ... s, at most 30 s apart, each failure counted against restart intensity.
SPAWN_RETRY_S, SPAWN_RETRY_MAX_S = 0.5, 30.0


class WorkerGone(Exception):
    pass


_GONE = object()


@dataclass(frozen=True)
class LastExit:
    reason: str
    exitcode: int | None
    at: str


class Incarnation:
    """One worker process, the pipe made for it alone, and a thread reading that pipe."""

    def __init__(self, slot: Slot, spec: WorkerSpec) -> None:
        self.loop = asyncio.get_running_loop()
        self.conn, child = _mp.Pipe(duplex=True)
        self.process = _mp.Process(target=worker.main, args=(child, spec, slot.index), name=f"capsd-slot-{slot.index}", daemon=True)
        try:
            self.process.start()
        except BaseException:
            self.conn.close()
            raise
        finally:
            child.close()  # else our copy keeps the pipe open and we never see the worker's death
        self.pid: int = self.process.pid  # type: ignore[assignment]
        self.started = time.monotonic()
        self.ready = False
        self.decoded = 0  # segments decoded; a fresh worker over max_rss_mb is not recycled again
        self.over_plan = False  # warned once that its RSS exceeds the memory plan's estimate
        self.replies: asyncio.Queue[Any] = asyncio.Queue()
        self.exited: asyncio.Future[int | None] = self.loop.create_future()
        # Sends run in a thread of their own: a stopped worker must block only its own slot.
        self.sender = ThreadPoolExecutor(1, thread_name_prefix=f"capsd-send-{slot.index}")
        self.slot = slot
        threading.Thread(target=self._read, name=f"capsd-read-{slot.index}", daemon=True).start()

    def _read(self) -> None:
        # EOF on the pipe is the moment the worker dies, whatever killed it.
        try:
            while True:
                self.loop.call_soon_threadsafe(self.slot.on_message, self, self.conn.recv())
        except (EOFError, OSError):
            pass
        self.process.join(5)
        if self.process.is_alive():  # closed its pipe but lingers: make sure it is gone
            self.process.kill()
            self.process.join()
        self.loop.call_soon_threadsafe(self.slot.on_exit, self, self.process.exitcode)

    async def send(self, message: tuple[str, int, Segment | None]) -> None:
        try:
            await self.loop.run_in_executor(self.sender, self.conn.send, message)
        except (OSError, ValueError):
            raise WorkerGone from None

    async def reply(self) -> Decoded:
        message = await self.replies.get()
        if message is _GONE:
            raise WorkerGone
        return message

    def close(self) -> None:
        # Closed from the sender thread, after any send still under way has failed on the dead
        # pipe: closing it under a blocked send would hand that send a stale file descriptor.
        self.sender.submit(self.conn.close)
        self.sender.shutdown(wait=False)
        self.replies.put_nowait(_GONE)

    def rss(self) -> int:
        try:
            return psutil.Process(self.pid).memory_info().rss
        except psutil.Error:
            return 0


class Slot:
    def __init__(
        self,
        index: int,
        spec: WorkerSpec,
        queue_limit: int,
        on_crash: Callable[[Slot], None],
        on_startup_failure: Callable[[Slot, str], None],
    ) -> None:
        self.index = index
        self.spec = spec
        self.queue_limit = queue_limit
        self.on_crash = on_crash
        self.on_startup_failure = on_startup_failure
        self.queue = SegmentQueue()
        self.room = asyncio.Event()  # set while the queue is below queue_limit
        self.room.set()
        self.cancels: deque[int] = deque()  # task keys whose partial results the worker may free
        self.open_tasks: set[Task] = set()  # accepted and not finished
        self.in_worker: set[Task] = set()  # partial result lives in the current incarnation
        self.in_flight: Task | None = None
        self.busy_since = 0.0
        self.incarnation: Incarnation | None = None
        self.exit_reason: str | None = None  # set just before we end an incarnation on purpose
        self.drain_reason: str | None = None
        self.drain_deadline = 0.0  # time.monotonic() when a drain is forced
        self.spawn_failures = 0  # in a row
        self.ever_ready = False
        self.failed = False
        self.tasks_done = self.tasks_failed = self.restarts = 0
        self.last_exit: LastExit | None = None
        self.wakeup = asyncio.Event()
        self.ready_event = asyncio.Event()
        self.stopping = False

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self.stopping:
            return
        try:
            self.incarnation = Incarnation(self, self.spec)
        except OSError as e:  # out of descriptors, processes or memory: try again later
            self.incarnation = None
            if not self.ever_ready:
                self.failed = True
                self.on_startup_failure(self, f"cannot start the worker of slot {self.index}: {e}")
                return
            delay = min(SPAWN_RETRY_MAX_S, SPAWN_RETRY_S * 2**self.spawn_failures)
            self.spawn_failures += 1
            log.error("cannot start worker", slot=self.index, error=str(e), retry_in_s=delay)
            self.on_crash(self)
            asyncio.get_running_loop().call_later(delay, self.start)
            return
        self.spawn_failures = 0
        log.info("worker started", slot=self.index, pid=self.incarnation.pid)

    def on_message(self, inc: Incarnation, message: Any) -> None:
        if isinstance(message, Ready):
            inc.ready = self.ever_ready = True
            self.ready_event.set()
            self.wakeup.set()
            log.info("worker ready", slot=self.index, pid=inc.pid, load_s=round(time.monotonic() - inc.started, 2))
        else:
            inc.replies.put_nowait(message)

    def on_exit(self, inc: Incarnation, exitcode: int | None) -> None:
        inc.close()
        inc.exited.set_result(exitcode)
        reason, self.exit_reason, self.drain_reason = self.exit_reason or "crashed", None, None
        lost, self.in_worker, self.in_flight = self.in_worker, set(), None
        if self.stopping:
            return
        if not self.ever_ready:
            self.failed = True
            self.on_startup_failure(
                self, f"worker of slot {self.index} died while loading the model (exit code {exitcode})"
            )
            return
        self.last_exit = LastExit(reason, exitcode, datetime.now(timezone.utc).isoformat(timespec="seconds"))
        level = log.info if reason in PLANNED and not lost else log.warning
        level(
            "worker exited",
            slot=self.index,
            pid=inc.pid,
            reason=reason,
            exitcode=exitcode,
            lost_tasks=[t.task_id for t in lost],
        )
        for task in lost:
            task.fail(EXIT_CODES[reason], f"the worker of slot {self.index} ended ({reason}, exit code {exitcode})")
        self.restarts += 1
        if reason not in PLANNED:
            self.on_crash(self)
        self.start()

    def kill(self, reason: str) -> None:
        """End the current incarnation now; its tasks fail with the code for `reason`."""
        inc = self.incarnation
        if inc and inc.process.is_alive():
            self.exit_reason = reason
            inc.process.kill()

    def drain(self, reason: str, timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Let tasks in progress finish, start no new one, then replace the process.

        The daemon forces the restart once `drain_deadline` has passed.
        """
        self.drain_reason = reason
        self.drain_deadline = time.monotonic() + timeout
        self.wakeup.set()

    async def stop(self, timeout: float) -> None:
        """Stop the worker for good (daemon shutdown)."""
        self.stopping = True
        inc = self.incarnation
        if inc is None or inc.exited.done():
            return
        try:
            await inc.send(("stop", 0, None))
            await asyncio.wait_for(asyncio.shield(inc.exited), timeout)
        except (WorkerGone, asyncio.TimeoutError):
            inc.process.kill()
            await inc.exited

    # -- work ---------------------------------------------------------------------------------

    def set_queue_limit(self, limit: int) -> None:
        self.queue_limit = limit
        if self.full:
            self.room.clear()
        else:
            self.room.set()

    @property
    def full(self) -> bool:
        return len(self.queue) >= self.queue_limit

    def accept(self, task: Task) -> None:
        """A new task homed here: it counts in status, and a stop waits for it or fails it."""
        self.open_tasks.add(task)

    def submit(self, task: Task, segment: Segment) -> None:
        """Queue a segment. Beyond queue_limit new tasks are refused and the connections with
        segments here are not read, so the queue stays near its limit (flow control)."""
        task.time_submit = time.time()
        self.queue.push(Waiting(task, segment, task.time_submit))
        task.owner.queued(self, segment.samples.nbytes)
        if self.full:
            self.room.clear()
        self.wakeup.set()

    def _left_queue(self, item: Waiting) -> None:
        item.task.owner.unqueued(self, item.nbytes)
        if not self.full:
            self.room.set()

    def cancel(self, task: Task) -> None:
        """The client went away: drop the task's queued segments and free its partial result."""
        self._forget(task)

    def finished(self, task: Task, failed: bool) -> None:
        if failed:
            self.tasks_failed += 1
        else:
            self.tasks_done += 1
        self._forget(task)

    def _forget(self, task: Task) -> None:
        self.open_tasks.discard(task)
        for item in self.queue.drop(task):
            self._left_queue(item)
        if task in self.in_worker:
            self.in_worker.discard(task)
            self.cancels.append(task.key)  # a no-op in the worker if this was its last segment
            self.wakeup.set()

    def _next_item(self) -> Waiting | int | None:
        """Cancels first, then the next segment (draining: only of tasks already in the worker)."""
        if self.cancels:
            return self.cancels.popleft()
        item = self.queue.pop(self.in_worker if self.drain_reason else None)
        if item is not None:
            self._left_queue(item)
        return item

    async def run(self) -> None:
        """Feed the worker, one segment at a time, for the life of the daemon."""
        while not self.stopping:
            inc = self.incarnation
            if inc and inc.ready and self.drain_reason and not self.in_worker and not self.cancels:
                await self._replace(inc)
                continue
            item = self._next_item() if inc and inc.ready else None
            if item is None:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            assert inc is not None
            if isinstance(item, int):
                try:
                    await inc.send(("cancel", item, None))
                except WorkerGone:
                    pass
                continue
            await self._decode(inc, item.task, item.segment, item.submitted)

    async def _decode(self, inc: Incarnation, task: Task, segment: Segment, submitted: float) -> None:
        if task.done:
            return
        self.in_worker.add(task)
        self.in_flight, self.busy_since = task, time.monotonic()
        try:
            await inc.send(("segment", task.key, segment))
            decoded = await inc.reply()
        except WorkerGone:
            return  # on_exit has failed the tasks that lived in the worker
        self.in_flight = None
        inc.decoded += 1
        if decoded.is_final:
            self.in_worker.discard(task)
        task.deliver(decoded, submitted)

    async def _replace(self, inc: Incarnation) -> None:
        self.exit_reason, self.drain_reason = self.drain_reason, None
        log.info("worker recycling", slot=self.index, pid=inc.pid, reason=self.exit_reason)
        try:
            await inc.send(("stop", 0, None))
        except WorkerGone:
            pass
        await asyncio.shield(inc.exited)

    # -- status -------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        inc = self.incarnation
        if self.failed:
            return "failed"
        if inc is None or not inc.ready:
            return "restarting" if self.ever_ready else "starting"
        if self.drain_reason:
            return "draining"
        return "busy" if self.in_flight else "ready"

    def status(self) -> dict[str, Any]:
        inc = self.incarnation
        return {
            "slot": self.index,
            "pid": inc.pid if inc else None,
            "state": self.state,
            "rss_bytes": inc.rss() if inc else 0,
            "queue_depth": len(self.queue),
            "tasks_in_progress": len(self.open_tasks),
            "tasks_done": self.tasks_done,
            "tasks_failed": self.tasks_failed,
            "restarts": self.restarts,
            "last_exit": dataclasses.asdict(self.last_exit) if self.last_exit else None,
            "uptime_s": round(time.monotonic() - inc.started, 1) if inc else 0.0,
        }
