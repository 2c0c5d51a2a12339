"""A slot: the home of the tasks routed to it, served by one worker incarnation at a time.

The slot's queue lives here, in the supervisor, for the life of the daemon. Each incarnation gets
a pipe of its own, so a process killed at any instant (idle in recv, mid-decode, mid-send) takes
nothing shared down with it (docs/design.md#queues-wedged-by-a-killed-process). Workers are
stateless (docs/design.md#stateless-workers): the slot hands its worker one job at a time, from
its own queue or, when it has nothing of its own, from another slot's (work stealing), so a dead
worker loses exactly the one job it was doing. The slot reports what happens to its worker; the
daemon decides what to do about it, and asks the slot to do it.

Life cycle: one stored `SlotState`, changed only by the slot's own methods, each change logged
once ("slot state", with from, to and why); the diagram is in docs/design.md#a-slots-life-cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from multiprocessing.connection import Connection
from typing import Any, Protocol

import psutil
import structlog

from capsd.control_protocol import DRAIN_TIMEOUT_S
from capsd.protocol import ErrorCode
from capsd.segment import Segment
from capsd.supervisor.metrics import Metrics
from capsd.supervisor.queue import Backlog, Waiting, next_job
from capsd.supervisor.task import Task
from capsd.worker import main as worker
from capsd.worker.messages import Beat, Decode, Decoded, Format, Job, Ready, Reply, Stop, WorkerSpec

log = structlog.get_logger("capsd.slot")

# spawn, not fork: the supervisor runs an event loop and threads (docs/design.md#fork-with-a-running-loop).
_mp = multiprocessing.get_context("spawn")
BUSY_WINDOW_S = 60.0  # status shows the share of this last stretch spent on jobs
# A job's deadline (docs/design.md#deadlines): its audio times the slot's measured seconds per
# audio second, times this, and never less than heartbeat_timeout_s.
DEADLINE_FACTOR = 4.0
RTF_WEIGHT = 0.3  # each finished decode's share in the slot's measured speed
ABORT_GRACE_S = 2.0  # a hung worker has this long after SIGABRT to write where it was stuck


def job_deadline(audio_s: float, rtf: float, heartbeat_timeout_s: float) -> float:
    """Seconds a worker may spend on a job of `audio_s` seconds at `rtf` seconds per audio second."""
    return max(heartbeat_timeout_s, audio_s * rtf * DEADLINE_FACTOR)


class SlotState(Enum):
    STARTING = "starting"  # its first worker loads the model
    READY = "ready"  # its worker waits for a job
    BUSY = "busy"  # its worker does a job
    DRAINING = "draining"  # its worker finishes the job in hand, then is replaced
    RESTARTING = "restarting"  # its worker ended; the next one is started (or loads)
    FAILED = "failed"  # its worker could not start or load: not started again
    RETIRING = "retiring"  # scaled away: no new job; goes when its last task ends
    GONE = "gone"  # removed from the pool

    @property
    def shown(self) -> str:
        """As status shows it (it names six states: docs/design.md#a-slots-life-cycle): a slot scaled away is draining."""
        return SlotState.DRAINING.value if self is SlotState.RETIRING else self.value


class ExitReason(Enum):
    """Why an incarnation ended: the error code of the task whose job died with it, and whether
    it counts against restart intensity (graceful recycles do not)."""

    CRASHED = "crashed"
    HUNG = "hung"
    NOT_LOADED = "not loaded"  # not ready within load_timeout_s: a crash
    RSS = "rss"
    REQUESTED = "requested"

    @property
    def code(self) -> ErrorCode:
        return {ExitReason.HUNG: ErrorCode.WORKER_HUNG, ExitReason.RSS: ErrorCode.WORKER_RESTARTED,
                ExitReason.REQUESTED: ErrorCode.WORKER_RESTARTED}.get(self, ErrorCode.WORKER_CRASHED)  # fmt: skip

    @property
    def counts(self) -> bool:
        return self in (ExitReason.CRASHED, ExitReason.HUNG, ExitReason.NOT_LOADED)

    @property
    def reported(self) -> str:
        """As status's last_exit says it: crashed, hung, rss or requested."""
        return "crashed" if self is ExitReason.NOT_LOADED else self.value


class WorkerGone(Exception):
    pass


_GONE = object()


@dataclass(frozen=True)
class LastExit:
    reason: str
    exitcode: int | None
    at: str


class Process(Protocol):
    """What an incarnation knows of its process: multiprocessing's, or a worker forked by a loader
    (capsd.supervisor.loader.Forked), whose pid comes with its Ready."""

    pid: int | None
    exitcode: int | None

    def is_alive(self) -> bool: ...

    def kill(self) -> None: ...

    def join(self, timeout: float | None = None) -> None: ...


def spawned(index: int, spec: WorkerSpec, child: Connection) -> Process:
    """A worker process of its own, which loads the model itself."""
    process = _mp.Process(target=worker.main, args=(child, spec, index, os.getpid()), name=f"capsd-slot-{index}",
                          daemon=True)  # fmt: skip
    process.start()
    return process  # type: ignore[return-value]


class Incarnation:
    """One worker process, the pipe made for it alone, and a thread reading that pipe. What
    happens to it shows in its futures: `loaded` (True at Ready, False if it died first) and
    `exited` (its exit code); it knows nothing of the slot it serves. `start` makes the process
    and hands it its end of the pipe: `spawned`, or a loader's fork."""

    def __init__(
        self, index: int, spec: WorkerSpec, start: Callable[[int, WorkerSpec, Connection], Process] = spawned
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.conn, child = _mp.Pipe(duplex=True)
        try:
            self.process = start(index, spec, child)
        except BaseException:
            self.conn.close()
            raise
        finally:
            child.close()  # else our copy keeps the pipe open and we never see the worker's death
        self.pid: int | None = self.process.pid  # a forked worker's comes with its Ready
        self.how = "spawn" if start is spawned else "fork"
        self.spec = spec
        self.started = time.monotonic()
        self.last_beat = self.started  # when it last said it is alive (written by the reader thread)
        self.ready = False
        self.warm_up: Ready | None = None  # its Ready: the first measure of its speed
        self.jobs = 0  # jobs done; a fresh worker over max_rss_mb is not recycled again
        self.over_plan = False  # warned once that its RSS exceeds the memory plan's estimate
        self.aborting = False  # hung: sent SIGABRT, SIGKILL follows
        self.replies: asyncio.Queue[Any] = asyncio.Queue()
        self.exited: asyncio.Future[int | None] = self.loop.create_future()
        self.loaded: asyncio.Future[bool] = self.loop.create_future()
        # Sends run in a thread of their own: a stopped worker must block only its own slot.
        self.sender = ThreadPoolExecutor(1, thread_name_prefix=f"capsd-send-{index}")
        threading.Thread(target=self._read, name=f"capsd-read-{index}", daemon=True).start()

    def _read(self) -> None:
        # EOF on the pipe is the moment the worker dies, whatever killed it.
        try:
            while True:
                message = self.conn.recv()
                if isinstance(message, Beat):  # twice a second: noted here, the loop not woken
                    self.last_beat = time.monotonic()
                elif isinstance(message, Ready):
                    if self.pid is None:
                        self.pid = self.process.pid = message.pid
                    self.loop.call_soon_threadsafe(self._ready, message)
                else:
                    self.loop.call_soon_threadsafe(self.replies.put_nowait, message)
        except (EOFError, OSError):
            pass
        self.process.join(5)
        if self.process.is_alive():  # closed its pipe but lingers: make sure it is gone
            self.kill()
            self.process.join()
        self.loop.call_soon_threadsafe(self._ended, self.process.exitcode)

    def _ready(self, message: Ready) -> None:
        self.ready, self.warm_up, self.last_beat = True, message, time.monotonic()
        self.loaded.set_result(True)

    def _ended(self, exitcode: int | None) -> None:
        self.close()
        self.exited.set_result(exitcode)
        if not self.loaded.done():
            self.loaded.set_result(False)

    async def send(self, message: Job | Stop) -> None:
        try:
            await self.loop.run_in_executor(self.sender, self.conn.send, message)
        except (OSError, ValueError, RuntimeError):  # RuntimeError: its sender was shut down, it is gone
            raise WorkerGone from None

    async def reply(self) -> Reply:
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

    def kill(self) -> None:
        """SIGKILL; a forked worker not yet known by its pid has its pipe shut instead, which
        ends it as soon as it is there, and ends this incarnation now."""
        if self.pid is not None:
            self.process.kill()
            return
        with contextlib.suppress(OSError, ValueError), socket.fromfd(self.conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.shutdown(socket.SHUT_RDWR)

    def rss(self) -> int:
        if self.pid is None:
            return 0
        try:
            return psutil.Process(self.pid).memory_info().rss
        except psutil.Error:
            return 0

    def private(self) -> tuple[int, int]:
        """(private, shared) resident bytes: USS, and RSS less USS. A worker forked from a loader
        shares the model with it and its siblings; what it holds alone is what it adds."""
        if self.pid is None:
            return 0, 0
        try:
            info = psutil.Process(self.pid).memory_full_info()
        except psutil.Error:
            return 0, 0
        return info.uss, info.rss - info.uss

    def peak_rss(self) -> int:
        """The most memory this process has held (VmHWM): what its model costs at its peak."""
        if self.pid is None:
            return 0
        try:
            with open(f"/proc/{self.pid}/status") as status:
                return next((int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")), 0)
        except (OSError, ValueError):
            return 0

    def cpu_seconds(self) -> float | None:
        if self.pid is None:
            return None
        try:
            times = psutil.Process(self.pid).cpu_times()
        except psutil.Error:
            return None
        return times.user + times.system


class Slot:
    def __init__(
        self,
        index: int,
        spec: WorkerSpec,
        queue_limit: int,
        stealing: bool,
        on_exit: Callable[[Slot, ExitReason, int | None, Waiting | None], None],
        metrics: Metrics | None = None,
        peers: Sequence[Slot] | None = None,
        spawn: Callable[[int, WorkerSpec], Incarnation] = Incarnation,
    ) -> None:
        self.index = index
        self.state = SlotState.STARTING
        self.spec = spec  # what the next incarnation runs
        self.ready_spec = spec  # what the last incarnation that became ready ran
        self.stealing = stealing
        self.on_worker_exit = on_exit  # the daemon decides what follows
        self.metrics = metrics or Metrics()
        self.peers: Sequence[Slot] = peers if peers is not None else [self]  # every slot, this one included
        self.spawn = spawn
        self.wakeup = asyncio.Event()
        self.backlog = Backlog(queue_limit, self._wake)
        self.open_tasks: set[Task] = set()  # homed here, accepted and not finished
        self.in_flight: Waiting | None = None  # the job in the worker
        self.busy_since = 0.0
        self.rtf = 0.0  # seconds its worker takes per second of audio, measured (docs/design.md#deadlines)
        self.incarnation: Incarnation | None = None
        self.reported: Incarnation | None = None  # the last incarnation whose end was handled here
        self.exit_reason: ExitReason | None = None  # set just before we end an incarnation on purpose
        self.drain_reason: ExitReason | None = None
        self.drain_deadline = 0.0  # time.monotonic() when the daemon forces the drain
        self.ever_ready = False
        self.tasks_done = self.tasks_failed = self.restarts = self.segments_decoded = 0
        self.busy: deque[tuple[float, float]] = deque()  # (start, end) of the last minute's jobs
        self.cpu: deque[tuple[float, float]] = deque()  # (when, CPU seconds) of the worker, last minute
        self.cpu_of: Incarnation | None = None  # the incarnation `cpu` is of
        self.last_exit: LastExit | None = None
        self.ready_event = asyncio.Event()  # set at each incarnation's Ready
        self.stopping = False  # its runner ends: the daemon stops, or the slot is gone

    # -- its state --------------------------------------------------------------------------------

    def _enter(self, state: SlotState, why: str) -> None:
        """The one place the state changes: logged once per change (busy and ready, one per
        job, at debug)."""
        if state is self.state:
            return
        quiet = {state, self.state} == {SlotState.READY, SlotState.BUSY}
        (log.debug if quiet else log.info)("slot state", slot=self.index, before=self.state.value,
                                           after=state.value, why=why)  # fmt: skip
        self.state = state

    @property
    def retiring(self) -> bool:
        return self.state is SlotState.RETIRING

    @property
    def failed(self) -> bool:
        return self.state is SlotState.FAILED

    # -- life cycle: the slot reports, the daemon decides and asks -----------------------------

    def start(self) -> None:
        """A new incarnation; OSError if it cannot be spawned (the daemon retries)."""
        self.incarnation = None
        self._enter(SlotState.RESTARTING if self.ever_ready else SlotState.STARTING, "worker starting")
        inc = self.incarnation = self.spawn(self.index, self.spec)
        inc.loaded.add_done_callback(lambda loaded: self._loaded(inc, loaded.result()))
        inc.exited.add_done_callback(lambda exited: self._exited(inc, exited.result()))
        log.info("worker started", slot=self.index, how=inc.how, **({"pid": inc.pid} if inc.pid else {}))

    def _loaded(self, inc: Incarnation, ok: bool) -> None:
        if not ok or inc is not self.incarnation:
            return
        self.ever_ready = True
        self.ready_spec = inc.spec
        if inc.warm_up is not None:
            self.rtf = inc.warm_up.warm_up_s / inc.warm_up.warm_up_audio_s
        self.ready_event.set()
        self.wakeup.set()
        log.info("worker ready", slot=self.index, pid=inc.pid, load_s=round(time.monotonic() - inc.started, 2),
                 rtf=round(self.rtf, 4))  # fmt: skip
        if self.state in (SlotState.STARTING, SlotState.RESTARTING):
            self._enter(SlotState.DRAINING if self.drain_reason else SlotState.READY, "worker ready")

    def _exited(self, inc: Incarnation, exitcode: int | None) -> None:
        self.reported = inc
        reason = self.exit_reason or ExitReason.CRASHED
        self.exit_reason = self.drain_reason = None
        lost, self.in_flight = self.in_flight, None
        self.ready_event.clear()
        for slot in self.peers:  # a job retried elsewhere may now have to run here
            slot.wakeup.set()
        if self.stopping:
            return
        if self.state not in (SlotState.RETIRING, SlotState.STARTING, SlotState.FAILED):
            self._enter(SlotState.RESTARTING, f"worker exited: {reason.value}")
        self.on_worker_exit(self, reason, exitcode, lost)
        if self.retiring:  # scaled away: its worker is not replaced
            self.incarnation = None

    def kill(self, reason: ExitReason) -> None:
        """End the current incarnation now; the job in it is lost (its task fails with reason.code,
        or the job runs once more: the daemon decides). A hung worker gets SIGABRT first, so that
        its faulthandler writes where it was stuck, and SIGKILL if it is still there ABORT_GRACE_S later."""
        inc = self.incarnation
        if not (inc and inc.process.is_alive()):
            return
        self.exit_reason = reason
        if reason is not ExitReason.HUNG:
            inc.kill()
            return
        inc.aborting = True
        try:
            os.kill(inc.pid, signal.SIGABRT)
            os.kill(inc.pid, signal.SIGCONT)  # a stopped process handles SIGABRT only once continued
        except ProcessLookupError:
            return
        asyncio.get_running_loop().call_later(ABORT_GRACE_S, lambda: inc.exited.done() or inc.kill())

    def drain(self, reason: ExitReason, timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Take no new job, let the one in the worker finish, then replace the process.

        The daemon forces the restart once `drain_deadline` has passed.
        """
        self.drain_reason = reason
        self.drain_deadline = time.monotonic() + timeout
        if self.state in (SlotState.READY, SlotState.BUSY):
            self._enter(SlotState.DRAINING, f"drain: {reason.value}")
        self.wakeup.set()

    def run_spec(self, spec: WorkerSpec) -> None:
        """What the next incarnation runs (a model change, or its roll back)."""
        self.spec = spec

    def count_restart(self, reason: ExitReason, exitcode: int | None) -> None:
        """The daemon replaces the worker that ended: counted in status and metrics."""
        at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.last_exit = LastExit(reason.reported, exitcode, at)
        self.restarts += 1
        self.metrics.restarts.labels(str(self.index), reason.reported).inc()

    def fail(self, why: str) -> None:
        """Its worker could not start or load: not started again (capsd refuses to start, or a
        scale is given up)."""
        self._enter(SlotState.FAILED, why)

    async def stop(self, timeout: float) -> None:
        """Stop the worker for good (daemon shutdown)."""
        self.stopping = True
        self.wakeup.set()
        inc = self.incarnation
        if inc is None or inc.exited.done():
            return
        try:
            await inc.send(Stop())
            await asyncio.wait_for(asyncio.shield(inc.exited), timeout)
        except (WorkerGone, asyncio.TimeoutError):
            inc.kill()
            await inc.exited

    def remove(self) -> None:
        """Scaled away and its last task ended: its runner ends."""
        self._enter(SlotState.GONE, "its last task ended")
        self.stopping = True
        self.wakeup.set()

    # -- work ---------------------------------------------------------------------------------

    @property
    def queue_limit(self) -> int:
        return self.backlog.limit

    def set_queue_limit(self, limit: int) -> None:
        self.backlog.set_limit(limit)

    @property
    def worker_gone(self) -> bool:
        """No worker process, or one whose end was handled here (reported to the daemon)."""
        return self.incarnation is None or self.incarnation is self.reported

    def full(self, urgent: bool = False) -> bool:
        """Whether a job of this kind may wait here (queue.Backlog.full)."""
        return self.backlog.full(urgent)

    def accept(self, task: Task) -> None:
        """A new task homed here: it counts in status, and a stop waits for it or fails it."""
        self.open_tasks.add(task)

    def submit(self, task: Task, work: Segment | str) -> None:
        """Queue a job of a task whose jobs wait here (its home, unless that was scaled away).
        At its bound (queue_limit, or MIC_RESERVE for urgent jobs) new tasks of that kind are
        refused and the connections with such jobs here are not read, so the queue stays near it."""
        task.time_submit = time.time()
        self.backlog.push(Waiting(task, work, task.time_submit))

    def retry(self, item: Waiting, lost_on: Slot, death: str, fault: bool) -> None:
        """A job of a task whose jobs wait here, lost with `lost_on`'s worker, runs once more:
        before any other job, on another slot where there is one (docs/design.md#retrying-a-lost-job)."""
        self.backlog.push(
            dataclasses.replace(item, lost_on=lost_on, deaths=(*item.deaths, death), faults=item.faults + fault)
        )

    def _wake(self) -> None:
        """A job was pushed here: who may take it."""
        for slot in self.peers if self.stealing else (self,):
            slot.wakeup.set()

    def cancel(self, task: Task) -> None:
        """The client went away: drop the task's waiting jobs (one in a worker is ignored)."""
        self._forget(task)

    def finished(self, task: Task, outcome: str) -> None:
        """A task homed here ended: "done", or the error code of its final frame."""
        self.count(task.source, outcome)
        if outcome == "done":
            self.metrics.recognised(task.partial.duration)
            if task.final_received is not None:
                self.metrics.latency.labels(task.source).observe(time.monotonic() - task.final_received)
        self._forget(task)

    def count(self, source: str, outcome: str) -> None:
        """Status and metrics count every task that ended, refused ones included, alike."""
        if outcome == "done":
            self.tasks_done += 1
        else:
            self.tasks_failed += 1
        self.metrics.tasks.labels(source, outcome).inc()

    def _forget(self, task: Task) -> None:
        self.open_tasks.discard(task)
        self._queue_of(task).backlog.drop(task)

    def _queue_of(self, task: Task) -> Slot:
        """The slot whose queue the task's jobs wait in: its home, unless that was scaled away."""
        return task.queue_slot  # type: ignore[return-value]  # a task sees its slots as task.Home

    def retire(self, home: Callable[[str], Slot], timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Scaled down (docs/design.md#changing-the-pool): take no new job; the jobs waiting here
        and those still to come of the tasks queued here move to the slot `home` names for their
        task; the worker finishes its job in hand and stops. The tasks homed here keep it as
        their home (their line in status) until they end."""
        self._enter(SlotState.RETIRING, "scaled away")
        for task in {task for slot in self.peers for task in slot.open_tasks if task.queue_slot is self}:
            task.queue_slot = home(task.task_id)
        for item in self.backlog.take_all():
            self._queue_of(item.task).backlog.push(item)
        self.drain(ExitReason.REQUESTED, timeout)

    def unretire(self, spec: WorkerSpec) -> None:
        """Scaled up again before it was gone: a slot like any other, its next worker running `spec`."""
        self.spec = spec
        self.drain_reason = None
        inc = self.incarnation
        if inc is not None and inc.ready and not inc.exited.done():
            self._enter(SlotState.BUSY if self.in_flight else SlotState.READY, "scaled up again")
        else:
            self._enter(SlotState.RESTARTING if self.ever_ready else SlotState.STARTING, "scaled up again")

    @property
    def serving(self) -> bool:
        """It has a worker, or will have one, that takes jobs."""
        return not (self.stopping or self.retiring or self.failed) and not self.worker_gone

    def _next(self) -> Waiting | None:
        others = [slot for slot in self.peers if slot is not self] if self.stealing else []
        alone = not any(slot.serving for slot in others)
        picked = next_job(self.backlog.jobs, [slot.backlog.jobs for slot in others], self, alone)
        if picked is None:
            return None
        jobs, item = picked
        next(slot for slot in self.peers if slot.backlog.jobs is jobs).backlog.taken(item)
        return item

    async def run(self) -> None:
        """Feed the worker, one job at a time, for the life of the daemon."""
        while not self.stopping:
            inc = self.incarnation
            item = None
            if inc is not None and inc.ready and not inc.exited.done():  # never a job to a dead worker
                if self.drain_reason:
                    await self._replace(inc)
                    continue
                item = self._next()
            if item is None:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            assert inc is not None
            await self._do(inc, item)

    async def _do(self, inc: Incarnation, item: Waiting) -> None:
        # In flight from this moment: a worker that dies at any instant from here on, mid-send
        # included, loses this job, and only this one.
        self.in_flight, self.busy_since = item, time.monotonic()
        if self.state is SlotState.READY:
            self._enter(SlotState.BUSY, "job")
        self.metrics.queue_wait.observe(max(0.0, time.time() - item.submitted))
        work = item.work
        job: Job = Decode(item.job, work.samples) if isinstance(work, Segment) else Format(item.job, work)
        try:
            await inc.send(job)
            reply = await inc.reply()
        except WorkerGone:
            await asyncio.shield(inc.exited)  # _exited reports the lost job; the next job waits for a new worker
            return
        self.in_flight = None
        if self.state is SlotState.BUSY:
            self._enter(SlotState.READY, "job done")
        now = time.monotonic()
        self._record_busy(self.busy_since, now)
        if isinstance(work, Segment):
            self.metrics.decode.observe(now - self.busy_since)
            if item.audio_s >= 1.0:  # shorter jobs are mostly fixed cost
                self.rtf += RTF_WEIGHT * ((now - self.busy_since) / item.audio_s - self.rtf)
        inc.jobs += 1
        if isinstance(reply, Decoded) and isinstance(work, Segment):
            self.segments_decoded += 1
            item.task.segment_decoded(work, reply.tokens, reply.timestamps, item.submitted)
        elif not isinstance(reply, Decoded):
            item.task.finish(reply.text, item.submitted)

    def hung(self, now: float, heartbeat_timeout_s: float) -> str | None:
        """Why the worker counts as hung (docs/design.md#deadlines), or None: its heartbeat
        stopped, or the job in hand outlived its deadline."""
        inc = self.incarnation
        if inc is None or not inc.ready or inc.exited.done():
            return None
        silent = now - inc.last_beat
        if silent > heartbeat_timeout_s:
            return f"no heartbeat for {silent:.1f} s (heartbeat_timeout_s = {heartbeat_timeout_s:g})"
        if self.in_flight is not None:
            busy, deadline = now - self.busy_since, job_deadline(self.in_flight.audio_s, self.rtf, heartbeat_timeout_s)
            if busy > deadline:
                return f"one job for {busy:.1f} s, past its deadline of {deadline:.1f} s"
        return None

    async def _replace(self, inc: Incarnation) -> None:
        self.exit_reason = self.drain_reason
        log.info("worker recycling", slot=self.index, pid=inc.pid, reason=self.drain_reason.value)
        try:
            await inc.send(Stop())
        except WorkerGone:
            pass
        await asyncio.shield(inc.exited)  # _exited has had the daemon start the replacement

    # -- status -------------------------------------------------------------------------------

    def _record_busy(self, start: float, end: float) -> None:
        self.busy.append((start, end))
        while self.busy and self.busy[0][1] < end - BUSY_WINDOW_S:
            self.busy.popleft()

    def sample_cpu(self, now: float) -> None:
        """Called by the daemon's watch loop: the worker's CPU time so far."""
        inc = self.incarnation
        seconds = inc.cpu_seconds() if inc else None
        if seconds is None:
            self.cpu.clear()
            return
        if self.cpu_of is not inc:  # a new incarnation: its process started with no CPU time
            self.cpu_of = inc  # (a fork may have done jobs before its first sample)
            self.cpu.clear()
            self.cpu.append((inc.started, 0.0))
        self.cpu.append((now, seconds))
        while len(self.cpu) > 2 and self.cpu[1][0] < now - BUSY_WINDOW_S:
            self.cpu.popleft()

    def cpu_share(self) -> float:
        """The worker's CPU time per wall second over the last minute: 1.0 is one core."""
        if len(self.cpu) < 2:
            return 0.0
        (t0, c0), (t1, c1) = self.cpu[0], self.cpu[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0

    def busy_share(self, now: float) -> float:
        """The share of the last minute this slot's worker spent on jobs."""
        since = now - BUSY_WINDOW_S
        spans = [*self.busy, *([(self.busy_since, now)] if self.in_flight else [])]
        return sum(max(0.0, end - max(start, since)) for start, end in spans) / BUSY_WINDOW_S

    def status(self) -> dict[str, Any]:
        inc = self.incarnation
        now = time.monotonic()
        private, shared = inc.private() if inc else (0, 0)
        return {
            "slot": self.index,
            "pid": inc.pid if inc else None,
            "state": self.state.shown,
            "rss_bytes": inc.rss() if inc else 0,
            "private_bytes": private,
            "shared_bytes": shared,
            "started": inc.how if inc else None,
            "queue_depth": len(self.backlog),
            "tasks_in_progress": len(self.open_tasks),
            "tasks_done": self.tasks_done,
            "tasks_failed": self.tasks_failed,
            "restarts": self.restarts,
            "last_exit": dataclasses.asdict(self.last_exit) if self.last_exit else None,
            "uptime_s": round(now - inc.started, 1) if inc else 0.0,
            "segments_decoded": self.segments_decoded,
            "busy_share": round(self.busy_share(now), 3),
            "cpu_share": round(self.cpu_share(), 3),
            "rtf": round(self.rtf, 4),
            "model": (inc.spec if inc else self.spec).model,
        }
