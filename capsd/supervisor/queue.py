"""A slot's waiting segments: dictation before files, each task's segments in order.

Pure bookkeeping, no I/O. Taking the next segment is O(1) however long the queue: mic and file
segments wait in a deque each, and a task's segments are all of one source, so each deque keeps
a task's segments in the order they were cut.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from capsd.segment import Segment

if TYPE_CHECKING:
    from capsd.supervisor.task import Task


@dataclass(frozen=True)
class Waiting:
    task: Task
    segment: Segment
    submitted: float  # time.time() when it was queued: the result frame's time_submit

    @property
    def nbytes(self) -> int:
        return self.segment.samples.nbytes


class SegmentQueue:
    def __init__(self) -> None:
        self.mic: deque[Waiting] = deque()
        self.file: deque[Waiting] = deque()

    def __len__(self) -> int:
        return len(self.mic) + len(self.file)

    def __iter__(self) -> Iterator[Waiting]:
        yield from self.mic
        yield from self.file

    def push(self, item: Waiting) -> None:
        (self.mic if item.task.source == "mic" else self.file).append(item)

    def pop(self, only: Container[Task] | None = None) -> Waiting | None:
        """The next segment to decode: someone is waiting for each dictation, so mic first.

        With `only`, the first segment of one of those tasks (a draining slot finishes the tasks
        its worker holds and starts no other): a scan, but only while draining.
        """
        for waiting in (self.mic, self.file):
            if only is None:
                if waiting:
                    return waiting.popleft()
                continue
            for i, item in enumerate(waiting):
                if item.task in only:
                    del waiting[i]
                    return item
        return None

    def drop(self, task: Task) -> list[Waiting]:
        """Remove every segment of `task`; returns them."""
        waiting = self.mic if task.source == "mic" else self.file
        dropped = [item for item in waiting if item.task is task]
        if dropped:
            kept = [item for item in waiting if item.task is not task]
            waiting.clear()
            waiting.extend(kept)
        return dropped
