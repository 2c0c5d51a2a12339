"""A task: all frames with one task_id on one connection, owned by one slot."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from capsd.protocol import Result
from capsd.segment import Segmenter
from capsd.worker.main import Decoded

if TYPE_CHECKING:
    from capsd.supervisor.slot import Slot

log = structlog.get_logger("capsd.task")
_keys = itertools.count(1)


@dataclass(eq=False)
class Task:
    task_id: str
    source: str  # "mic" | "file"
    time_start: float
    slot: Slot
    segmenter: Segmenter
    send: Callable[[str], None]  # queues a frame for the task's client
    key: int = field(default_factory=lambda: next(_keys))
    time_submit: float = 0.0
    duration: float = 0.0
    done: bool = False

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
        self.send(result.to_json())
        if decoded.is_final:
            self.done = True
            self.slot.finished(self, failed=False)

    def fail(self, code: str, message: str) -> None:
        """Tell the client once, with a complete final frame, and forget the task."""
        if self.done:
            return
        self.done = True
        self.segmenter.clear()
        result = Result(self.task_id, self.time_start, self.time_submit, time.time(), self.duration)
        self.send(result.to_json(error=(code, message)))
        log.warning("task failed", slot=self.slot.index, task=self.task_id, code=code, reason=message)
        self.slot.finished(self, failed=True)
