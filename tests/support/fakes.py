"""Fakes for the supervisor's in-process tests: a client as a task sees it, a worker's
incarnation with no process behind it, segments that say which they are."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np

from capsd.segment import Segment
from capsd.supervisor.slot import _GONE, Slot, WorkerGone
from capsd.supervisor.task import Task
from capsd.worker.messages import Decoded, Formatted, WorkerSpec


class Client:
    """A connection as a task sees it (task.Owner): records frames, counts queued jobs."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.queued_jobs = 0

    def send(self, frame: str, partial: bool = False) -> None:
        self.frames.append(json.loads(frame))

    def queued(self, slot: Slot, nbytes: int, urgent: bool) -> None:
        self.queued_jobs += 1

    def unqueued(self, slot: Slot, nbytes: int, urgent: bool) -> None:
        self.queued_jobs -= 1

    def ended(self, task: Task, error_frame: str | None = None) -> None:
        if error_frame:
            self.send(error_frame)


def segment(index: int, seconds: float = 2.0, last: bool = False) -> Segment:
    """A segment whose samples say which one it is, so a fake worker can answer for it."""
    samples = np.full(round(seconds * 16000), index, dtype=np.float32)
    return Segment(index, offset=index * seconds, overlap=0.0, samples=samples, is_last=last)


class FakeProcess:
    """A worker's process: alive until killed."""

    def __init__(self) -> None:
        self.alive = True

    def is_alive(self) -> bool:
        return self.alive

    def kill(self) -> None:
        self.alive = False


class FakeIncarnation:
    """What a slot sees of one incarnation of its worker, with no process behind it: futures for
    its load and its exit, and the replies a test queues (the end of its pipe: `_GONE`)."""

    def __init__(self, spec: WorkerSpec, pid: int) -> None:
        loop = asyncio.get_running_loop()
        self.spec, self.pid = spec, pid
        self.ready, self.jobs, self.started, self.warm_up, self.how = False, 0, 0.0, None, "spawn"
        self.process = FakeProcess()
        self.exited: asyncio.Future[int | None] = loop.create_future()
        self.loaded: asyncio.Future[bool] = loop.create_future()
        self.replies: asyncio.Queue[Any] = asyncio.Queue()

    async def reply(self) -> Decoded | Formatted:
        message = await self.replies.get()
        if message is _GONE:
            raise WorkerGone
        return message

    def kill(self) -> None:
        self.process.kill()

    def rss(self) -> int:
        return 0

    def private(self) -> tuple[int, int]:
        return 0, 0
