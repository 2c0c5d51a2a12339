"""What one client makes the supervisor hold, against its own bounds and the intake's.

A client (a WebSocket connection, `front.Client`, or an API request, `api.server.Transcription`)
holds audio in its tasks' segmenters (buffered, not yet cut) and in its segments waiting in the
slots (queued). Both count in the daemon-wide intake too (docs/design.md#intake). Audio queued is
held back by flow control: the client is not read while too much of it waits, or while a slot
where its segments wait is full (docs/design.md#flow-control). Audio buffered cannot drain by
waiting: a task that would pass its bound fails (README, Limits).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import numpy as np

from capsd.protocol import ErrorCode
from capsd.supervisor.intake import Intake
from capsd.supervisor.queue import MIC_RESERVE, Backlog
from capsd.supervisor.slot import Slot
from capsd.supervisor.task import Task

# Per-client bounds, so one client cannot grow capsd's memory or work without limit:
MAX_WAITING_AUDIO_BYTES = 16 * 2**20  # audio buffered + queued (~4.4 min): beyond it, not read
MAX_WAITING_SEGMENTS = 32  # segments queued: beyond it, not read (one client cannot fill a slot)
MAX_BUFFERED_AUDIO_BYTES = 32 * 2**20  # audio not yet cut (~8.7 min), or one frame: its task fails


def refusal(slot: Slot, urgent: bool, accepting: bool) -> tuple[ErrorCode, str] | None:
    """Why a client may not open a new task on `slot` (a mic task when `urgent`), or None: capsd
    is stopping (tasks in progress may finish), or the slot's jobs of its kind wait up to their
    bound (dictation has a reserve of its own: docs/design.md#dictation-first)."""
    if not accepting:
        return ErrorCode.SHUTTING_DOWN, "capsd is stopping"
    if slot.full(urgent):
        kind, bound = ("mic", f"its reserve of {MIC_RESERVE}") if urgent else ("file", f"queue_limit {slot.queue_limit}")
        return ErrorCode.OVERLOADED, f"slot {slot.index} has {kind} jobs waiting up to {bound}"
    return None


class Holding:
    """The audio one client's tasks hold, buffered and queued (the queued half of `task.Owner`),
    and what reading more of it waits for."""

    def __init__(self, intake: Intake, max_buffered: int) -> None:
        self.intake = intake  # what every client together holds
        self.max_buffered = max_buffered  # audio buffered: a task that would pass it fails
        self.buffered_bytes = 0  # audio in the tasks' segmenters
        self.queued_bytes = 0  # audio in segments waiting in the slots' queues
        self.queued_per_slot: Counter[tuple[Backlog, bool]] = Counter()  # jobs waiting, per slot and urgency
        self.drained = asyncio.Event()  # set when queued audio went below its bound

    def queued(self, slot: Backlog, nbytes: int, urgent: bool) -> None:
        self.queued_bytes += nbytes
        self.queued_per_slot[slot, urgent] += 1
        self.intake.add(queued=nbytes)

    def unqueued(self, slot: Backlog, nbytes: int, urgent: bool) -> None:
        self.queued_bytes -= nbytes
        self.queued_per_slot[slot, urgent] -= 1
        if not self.over_waiting_bound():
            self.drained.set()
        self.intake.add(queued=-nbytes)

    def buffer(self, nbytes: int) -> None:
        """Audio buffered in this client's segmenters grew (or shrank) by `nbytes`."""
        self.buffered_bytes += nbytes
        self.intake.add(buffered=nbytes)

    def release(self, task: Task) -> None:
        """The task ended: the audio its segmenter held is let go (`task.Owner.ended`)."""
        self.buffer(-task.segmenter.buffered_bytes)
        task.segmenter.clear()

    def feed(self, task: Task, samples: np.ndarray, is_final: bool) -> None:
        """`samples` of `task` into its segmenter, and the segments cut to its slot. The task fails
        (overloaded) if its audio would take this client's buffered audio past `max_buffered`, or
        all clients' past the intake's bound: audio not yet cut cannot drain by waiting."""
        if self.buffered_bytes + samples.nbytes > self.max_buffered:
            task.fail(ErrorCode.OVERLOADED, f"more than {self.max_buffered >> 20} MiB of audio buffered on this connection")
            return
        before = task.segmenter.buffered_bytes
        segments = task.segmenter.feed(samples, is_final)
        self.buffer(grown := task.segmenter.buffered_bytes - before)
        if grown > 0 and self.intake.buffered_over(task.source == "mic"):
            held = self.intake.buffered >> 20
            task.fail(ErrorCode.OVERLOADED, f"capsd holds {held} MiB of audio not yet cut into segments, over its bound")
            return
        for segment in segments:
            task.submit(segment)

    def over_waiting_bound(self) -> bool:
        # Audio only buffered (not cut) cannot drain by waiting: it has its own bound.
        queued = self.queued_per_slot.total()
        return queued > 0 and (
            queued > MAX_WAITING_SEGMENTS or self.queued_bytes + self.buffered_bytes > MAX_WAITING_AUDIO_BYTES
        )

    def blocked_on(self) -> asyncio.Event | None:
        """What reading more of this client waits for: its queued audio to drain, or room in a
        slot where its segments wait; None: nothing."""
        if self.over_waiting_bound():
            self.drained.clear()
            return self.drained
        return next((slot.room[urgent] for (slot, urgent), n in self.queued_per_slot.items()
                     if n and slot.full(urgent)), None)  # fmt: skip

    async def room(self, gone: asyncio.Future[Any]) -> None:
        """Until this client may be read again, or `gone` (the client is) is done."""
        while not gone.done() and (event := self.blocked_on()) is not None:
            waiting = asyncio.ensure_future(event.wait())
            try:
                await asyncio.wait([waiting, gone], return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiting.cancel()
