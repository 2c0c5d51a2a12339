"""Waiting work and the choice of what a worker does next: pure bookkeeping, no I/O.

Each slot has a queue of the jobs of the tasks homed on it: segments to decode and finished
texts to punctuate. Mic segments and texts wait in one deque, file segments in another, so
dictation goes first and taking the next job is O(1) however long the queue. A slot with
nothing of its own to do helps the others (docs/design.md#work-stealing): their mic jobs
first, then the oldest file segment.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from capsd.segment import Segment

if TYPE_CHECKING:
    from capsd.supervisor.task import Task


@dataclass(frozen=True)
class Waiting:
    task: Task
    work: Segment | str  # a segment to decode, or a finished task's text to punctuate
    submitted: float  # time.time() when it was queued: the result frame's time_submit

    @property
    def nbytes(self) -> int:
        return self.work.samples.nbytes if isinstance(self.work, Segment) else 0

    @property
    def urgent(self) -> bool:
        """Someone is waiting for each dictation, and a text to punctuate ends a task."""
        return self.task.source == "mic" or isinstance(self.work, str)


class JobQueue:
    def __init__(self) -> None:
        self.urgent: deque[Waiting] = deque()
        self.file: deque[Waiting] = deque()

    def __len__(self) -> int:
        return len(self.urgent) + len(self.file)

    def __iter__(self) -> Iterator[Waiting]:
        yield from self.urgent
        yield from self.file

    def push(self, item: Waiting) -> None:
        (self.urgent if item.urgent else self.file).append(item)

    def pop(self) -> Waiting | None:
        for waiting in (self.urgent, self.file):
            if waiting:
                return waiting.popleft()
        return None

    def drop(self, task: Task) -> list[Waiting]:
        """Remove every job of `task`; returns them."""
        dropped = [item for item in self if item.task is task]
        if dropped:
            for waiting in (self.urgent, self.file):
                kept = [item for item in waiting if item.task is not task]
                waiting.clear()
                waiting.extend(kept)
        return dropped


def next_job(own: JobQueue, others: Sequence[JobQueue]) -> tuple[JobQueue, Waiting] | None:
    """What an idle worker does next, and whose queue it comes from: its own slot's next job;
    else another slot's urgent job; else the oldest file segment waiting anywhere."""
    if own:
        return own, own.pop()  # type: ignore[return-value]
    helped = next((queue for queue in others if queue.urgent), None)
    if helped is None:
        helped = min((queue for queue in others if queue.file), key=lambda q: q.file[0].submitted, default=None)
    if helped is None:
        return None
    return helped, helped.pop()  # type: ignore[return-value]
