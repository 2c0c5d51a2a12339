"""A task: all frames with one task_id on one connection, owned by one slot."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import structlog

from capsd.protocol import Result, clip
from capsd.segment import Segmenter
from capsd.worker.main import Decoded

if TYPE_CHECKING:
    from capsd.supervisor.slot import Slot

log = structlog.get_logger("capsd.task")
_keys = itertools.count(1)


class Owner(Protocol):
    """The connection a task belongs to: it sends the task's frames and counts what it holds."""

    def send(self, frame: str) -> None: ...

    def queued(self, slot: Slot, nbytes: int) -> None: ...

    def unqueued(self, slot: Slot, nbytes: int) -> None: ...

    def ended(self, task: Task, error_frame: str | None = None) -> None: ...


@dataclass(eq=False)
class Task:
    task_id: str
    source: str  # "mic" | "file"
    time_start: float
    slot: Slot
    segmenter: Segmenter
    owner: Owner
    key: int = field(default_factory=lambda: next(_keys))
    time_submit: float = 0.0
    duration: float = 0.0
    done: bool = False  # its final frame is sent, or it was cancelled

    def deliver(self, decoded: Decoded, time_submit: float) -> None:
        if self.done:
            return
        self.duration = decoded.duration
        result = Result(
            self.task_id,
            self.time_start,
            time_submit,
            time.time(),
            decoded.duration,
            decoded.text,
            decoded.text_accu,
            decoded.tokens,
            decoded.timestamps,
            decoded.is_final,
        )
        if decoded.is_final:
            self.done = True
            self.owner.ended(self)
        self.owner.send(result.to_json())
        if decoded.is_final:
            self.slot.finished(self, failed=False)

    def fail(self, code: str, message: str) -> None:
        """Forget the task; its client gets a complete error frame as its final frame."""
        if self.done:
            return
        self.done = True
        now = time.time()
        result = Result(self.task_id, self.time_start, self.time_submit or now, now, self.duration)
        self.owner.ended(self, result.to_json(error=(code, message)))
        log.warning("task failed", slot=self.slot.index, task=clip(self.task_id), code=code, reason=message)
        self.slot.finished(self, failed=True)

    def cancel(self) -> None:
        """The client went away: nobody to tell; the slot drops what it holds of the task."""
        if self.done:
            return
        self.done = True
        self.owner.ended(self)
        self.slot.cancel(self)
