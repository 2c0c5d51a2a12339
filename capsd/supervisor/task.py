"""A task: all frames with one task_id on one connection, homed on one slot, merged here.

Workers keep nothing between segments (docs/design.md#stateless-workers): the task holds its
partial result, merges its segments in order as their decodes come back from any slot (one
decoded out of order waits for those before it), and sends a partial frame each time the
merged prefix grows (at most one every PARTIAL_INTERVAL_S), then exactly one final frame.

A task may run for hours: what a segment costs here does not grow with the task
(docs/design.md#long-tasks).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import structlog

from capsd import textformat
from capsd.merge import PartialResult, realign
from capsd.protocol import ErrorCode, Result, clip
from capsd.segment import Segment, Segmenter
from capsd.worker.messages import MIN_DECODE_SAMPLES

log = structlog.get_logger("capsd.task")
_keys = itertools.count(1)
# Partial frames carry the whole task so far (docs/design.md#long-tasks): at most one per
# PARTIAL_INTERVAL_S, and no more than PARTIAL_BYTES_PER_S of them, the latest merged state.
PARTIAL_INTERVAL_S = 0.5
PARTIAL_BYTES_PER_S = 500_000
# A final frame of more tokens is formatted and realigned in a thread, off the event loop.
INLINE_FINAL_TOKENS = 2000
MAX_TASK_S = 24 * 3600.0  # audio seconds; a task reaching beyond fails with overloaded


class Owner(Protocol):
    """The connection a task belongs to: it sends the task's frames and counts what it holds
    (`backlog`: the slot's queue.Backlog where a job of the task waits)."""

    def send(self, frame: str, partial: bool = False) -> None: ...

    def queued(self, backlog: Any, nbytes: int, urgent: bool) -> None: ...

    def unqueued(self, backlog: Any, nbytes: int, urgent: bool) -> None: ...

    def ended(self, task: Task, error_frame: str | None = None) -> None: ...


class Home(Protocol):
    """The slot a task is homed on, as the task sees it: where its jobs wait, and where it
    reports its end (so that a task knows nothing of slots)."""

    index: int

    def submit(self, task: Task, work: Segment | str) -> None:
        """Queue a job of the task."""

    def finished(self, task: Task, outcome: str) -> None:
        """The task ended: "done", or the error code of its final frame."""

    def cancel(self, task: Task) -> None:
        """The client went away: the task ended without a final frame."""


class Piece(NamedTuple):
    """A decoded segment waiting to be merged: where it lies, what was recognised in it."""

    offset: float
    overlap: float
    end: float
    is_last: bool
    tokens: list[str]
    timestamps: list[float]
    submitted: float


@dataclass(frozen=True)
class Formatting:
    """`[format]`: what a final result goes through (docs/design.md#text_accu-on-the-final-frame)."""

    num: bool = True
    spell: bool = True
    punctuate: bool = False  # a worker adds punctuation first, with the punctuation model


@dataclass(eq=False)
class Task:
    task_id: str
    source: str  # "mic" | "file"
    time_start: float
    slot: Home  # its home: its queue_limit, its line in status, and its queue ...
    segmenter: Segmenter
    owner: Owner
    formatting: Formatting = field(default_factory=Formatting)
    key: int = field(default_factory=lambda: next(_keys))
    time_submit: float = 0.0
    partial: PartialResult = field(default_factory=PartialResult)
    decoded: dict[int, Piece] = field(default_factory=dict)  # by segment index, not merged yet
    merged: int = 0  # segments merged, in order
    final_received: float | None = None  # time.monotonic() when the client's is_final frame came
    last_submitted: float = 0.0  # when the segment behind the latest merged state was queued
    partial_due: float = 0.0  # time.monotonic() from which the next partial frame may go
    held_partial: asyncio.TimerHandle | None = None  # sends the latest state once it is due
    finishing: asyncio.Future[None] | None = None  # its final frame, being built in a thread
    done: bool = False  # its final frame is sent (or owed), or it was cancelled
    # ... unless its home was scaled away: then its jobs wait in another slot's queue.
    queue_slot: Home = field(init=False)

    def __post_init__(self) -> None:
        self.queue_slot = self.slot

    def submit(self, segment: Segment) -> None:
        """A segment cut from the client's audio: to its home slot's queue, or, if too short to
        hold a word, merged as empty at once."""
        if self.done:
            return
        if segment.end > MAX_TASK_S:
            self.fail(
                ErrorCode.OVERLOADED,
                f"the task is longer than {MAX_TASK_S / 3600:g} h of audio, the longest capsd takes",
            )
        elif len(segment.samples) < MIN_DECODE_SAMPLES:
            self.segment_decoded(segment, [], [], time.time())
        else:
            self.queue_slot.submit(self, segment)

    def segment_decoded(self, segment: Segment, tokens: list[str], timestamps: list[float], submitted: float) -> None:
        if self.done:
            return  # failed or cancelled meanwhile: a late decode from another slot
        self.decoded[segment.index] = Piece(
            segment.offset, segment.overlap, segment.end, segment.is_last, tokens, timestamps, submitted
        )
        last = None
        while self.merged in self.decoded:
            last = self.decoded.pop(self.merged)
            self.partial.add(last.offset, last.overlap, last.tokens, last.timestamps, last.end)
            self.merged += 1
        if last is None:
            return
        self.last_submitted = last.submitted
        if not last.is_last:
            self._partial_merged()
            return
        self._drop_held_partial()  # superseded by the final frame
        if self.formatting.punctuate:
            self.queue_slot.submit(self, self.partial.text)
        else:
            self.finish(self.partial.text, last.submitted)

    def _partial_merged(self) -> None:
        """The merged prefix grew: its partial frame now if one is due, else once it is due
        (with whatever has been merged by then)."""
        if self.held_partial is not None:
            return
        wait = self.partial_due - time.monotonic()
        if wait <= 0:
            self._send_partial()
        else:
            self.held_partial = asyncio.get_running_loop().call_later(wait, self._send_partial)

    def _send_partial(self) -> None:
        self.held_partial = None
        text = self.partial.text
        frame = Result(self.task_id, self.time_start, self.last_submitted, time.time(), self.partial.duration,
                       text, text, self.partial.tokens, self.partial.timestamps).to_json()  # fmt: skip
        self.owner.send(frame, partial=True)
        # Its encoding and its bytes are O(task): a long task's frames come further apart.
        self.partial_due = time.monotonic() + max(PARTIAL_INTERVAL_S, len(frame) / PARTIAL_BYTES_PER_S)

    def _drop_held_partial(self) -> None:
        if self.held_partial is not None:
            self.held_partial.cancel()
            self.held_partial = None

    def finish(self, text: str, submitted: float) -> None:
        """The final frame: text formatted, text_accu the same, tokens realigned to it; a long
        task's in a thread (docs/design.md#long-tasks). Until it is sent the task may still fail
        or be cancelled: then that is its end, and the frame built meanwhile is dropped."""
        if self.done or self.finishing is not None:
            return
        if len(self.partial.tokens) <= INLINE_FINAL_TOKENS:
            self._send_final(self._final_frame(text, submitted))
        else:
            self.finishing = asyncio.ensure_future(self._finish_in_thread(text, submitted))

    async def _finish_in_thread(self, text: str, submitted: float) -> None:
        self._send_final(await asyncio.to_thread(self._final_frame, text, submitted))

    def _final_frame(self, text: str, submitted: float) -> str:
        # Punctuation, if any, came from a worker; numerals and spacing are pure code. Nothing
        # changes the merged result once its last segment is in, so a thread may read it.
        text = textformat.format_final(text, num=self.formatting.num, spell=self.formatting.spell, punctuator=None)
        tokens, timestamps = realign(self.partial.tokens, self.partial.timestamps, text)
        return Result(self.task_id, self.time_start, submitted, time.time(), self.partial.duration, text, text,
                      tokens, timestamps, is_final=True).to_json()  # fmt: skip

    def _send_final(self, frame: str) -> None:
        if self.done:
            return  # failed or cancelled while its final frame was built: that was its end
        self.done = True
        self.owner.ended(self)
        self.owner.send(frame)
        self.slot.finished(self, "done")

    def fail(self, code: ErrorCode, message: str) -> None:
        """Forget the task; its client gets a complete error frame as its final frame."""
        if self.done:
            return
        self.done = True
        self._drop_held_partial()
        now = time.time()
        result = Result(self.task_id, self.time_start, self.time_submit or now, now, self.partial.duration)
        self.owner.ended(self, result.to_json(error=(code, message)))
        log.warning("task failed", slot=self.slot.index, task=clip(self.task_id), code=str(code), reason=message)
        self.slot.finished(self, code)

    def cancel(self) -> None:
        """The client went away: nobody to tell; the slot drops what it holds of the task."""
        if self.done:
            return
        self.done = True
        self._drop_held_partial()
        self.owner.ended(self)
        self.slot.cancel(self)
