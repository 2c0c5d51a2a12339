"""Waiting work and the choice of what a worker does next: pure bookkeeping, no I/O.

Each slot has a queue of the jobs of the tasks homed on it: segments to decode and finished
texts to punctuate. Mic segments and texts wait in one deque, file segments in another, so
dictation goes first and taking the next job is O(1) however long the queue. A slot with
nothing of its own to do helps the others (docs/design.md#work-stealing): their mic jobs
first, then the oldest file segment. A job whose worker died and that is to run once more
(docs/design.md#retrying-a-lost-job) goes before all of them, on another slot where there is one.

A slot's `Backlog` is its queue with its accounting: the bound per kind of job, the events that
say there is room again, and what each connection is told it has waiting.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from capsd.segment import Segment

if TYPE_CHECKING:
    from capsd.supervisor.task import Task

_jobs = itertools.count(1)
# Mic jobs (and texts to punctuate) that may wait per slot, apart from queue_limit, which counts
# file segments: files cannot lock dictation out (docs/design.md#dictation-first).
MIC_RESERVE = 64


@dataclass(frozen=True)
class Waiting:
    task: Task
    work: Segment | str  # a segment to decode, or a finished task's text to punctuate
    submitted: float  # time.time() when it was queued: the result frame's time_submit
    job: int = field(default_factory=lambda: next(_jobs))
    lost_on: object = None  # the slot whose worker died with it, when it runs once more
    deaths: tuple[str, ...] = ()  # how each worker that died with it ended
    faults: int = 0  # of those deaths, the ones that may be the job's fault (crashed, hung)

    @property
    def nbytes(self) -> int:
        return self.work.samples.nbytes if isinstance(self.work, Segment) else 0

    @property
    def audio_s(self) -> float:
        return self.work.end - self.work.offset if isinstance(self.work, Segment) else 0.0

    @property
    def urgent(self) -> bool:
        """Someone is waiting for each dictation, and a text to punctuate ends a task."""
        return self.task.source == "mic" or isinstance(self.work, str)


class JobQueue:
    def __init__(self) -> None:
        self.retried: deque[Waiting] = deque()  # lost with a worker, to run once more: first of all
        self.urgent: deque[Waiting] = deque()
        self.file: deque[Waiting] = deque()

    def __len__(self) -> int:
        return len(self.retried) + len(self.urgent) + len(self.file)

    def __iter__(self) -> Iterator[Waiting]:
        yield from self.retried
        yield from self.urgent
        yield from self.file

    def urgent_count(self) -> int:
        """Urgent jobs waiting, retried ones included."""
        return len(self.urgent) + sum(item.urgent for item in self.retried)

    def push(self, item: Waiting) -> None:
        (self.retried if item.lost_on is not None else self.urgent if item.urgent else self.file).append(item)

    def pop(self) -> Waiting | None:
        """The next job that is not a retried one."""
        for waiting in (self.urgent, self.file):
            if waiting:
                return waiting.popleft()
        return None

    def pop_retried(self, me: object, alone: bool) -> Waiting | None:
        """A retried job for slot `me`: one lost on another slot, or on `me` when no other slot can take it."""
        item = next((item for item in self.retried if item.lost_on is not me or alone), None)
        if item is not None:
            self.retried.remove(item)
        return item

    def drop(self, task: Task) -> list[Waiting]:
        """Remove every job of `task`; returns them."""
        dropped = [item for item in self if item.task is task]
        if dropped:
            for waiting in (self.retried, self.urgent, self.file):
                kept = [item for item in waiting if item.task is not task]
                waiting.clear()
                waiting.extend(kept)
        return dropped


class Backlog:
    """A slot's waiting jobs, and their accounting: each job pushed or taken is told to its
    task's connection (`task.Owner.queued`, `unqueued`), and `room` says, per kind of job
    (urgent or not), whether one more may wait. `wake` is called at each push: who may take it."""

    def __init__(self, limit: int, wake: Callable[[], None]) -> None:
        self.jobs = JobQueue()
        self.limit = limit  # queue_limit: file segments
        self.wake = wake
        self.room = {urgent: asyncio.Event() for urgent in (False, True)}
        self._update_room()

    def __len__(self) -> int:
        return len(self.jobs)

    def full(self, urgent: bool = False) -> bool:
        """Whether a job of this kind may wait here: file segments up to `limit`, urgent jobs
        (mic segments, texts to punctuate) up to MIC_RESERVE of their own."""
        if urgent:
            return self.jobs.urgent_count() >= MIC_RESERVE
        return len(self.jobs) - self.jobs.urgent_count() >= self.limit

    def set_limit(self, limit: int) -> None:
        self.limit = limit
        self._update_room()

    def push(self, item: Waiting) -> None:
        self.jobs.push(item)
        item.task.owner.queued(self, item.nbytes, item.urgent)
        self._update_room()
        self.wake()

    def taken(self, item: Waiting) -> None:
        """`item` left the queue (popped by `next_job`)."""
        item.task.owner.unqueued(self, item.nbytes, item.urgent)
        self._update_room()

    def drop(self, task: Task) -> None:
        """Forget every job of `task`."""
        for item in self.jobs.drop(task):
            self.taken(item)

    def take_all(self) -> list[Waiting]:
        """Every job waiting, in order, taken out."""
        items, self.jobs = list(self.jobs), JobQueue()
        for item in items:
            self.taken(item)
        return items

    def _update_room(self) -> None:
        for urgent, room in self.room.items():
            (room.clear if self.full(urgent) else room.set)()


def next_job(own: JobQueue, others: Sequence[JobQueue], me: object = None, alone: bool = True) -> tuple[JobQueue, Waiting] | None:
    """What an idle worker (of slot `me`) does next, and whose queue it comes from: a retried
    job lost on another slot (or on this one, when it is `alone`: no other slot can take it);
    else its own slot's next job; else another slot's urgent job; else the oldest file segment
    waiting anywhere."""
    for queue in (own, *others):
        item = queue.pop_retried(me, alone)
        if item is not None:
            return queue, item
    if own.urgent or own.file:
        return own, own.pop()  # type: ignore[return-value]
    helped = next((queue for queue in others if queue.urgent), None)
    if helped is None:
        helped = min((queue for queue in others if queue.file), key=lambda q: q.file[0].submitted, default=None)
    if helped is None:
        return None
    return helped, helped.pop()  # type: ignore[return-value]
