"""What one client holds (capsd.supervisor.holding): the rules that a WebSocket connection and an
API request share, in-process, with real tasks, segmenters, backlogs and an intake. The same rules
against a real capsd: tests/test_hostile.py (flow control), tests/test_serve.py and
tests/test_intake.py (the buffered bounds), tests/test_api.py (an API request's)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import numpy as np
import pytest

from capsd.api.server import Transcription
from capsd.memory import DICTATION_RESERVE_BYTES, MIB
from capsd.protocol import RATE
from capsd.segment import Segment, Segmenter
from capsd.supervisor.holding import MAX_BUFFERED_AUDIO_BYTES, MAX_WAITING_AUDIO_BYTES, MAX_WAITING_SEGMENTS
from capsd.supervisor.intake import Intake
from capsd.supervisor.queue import Backlog, Waiting
from capsd.supervisor.task import Task

pytestmark = pytest.mark.unit


class Home:
    """A task's home as the task sees it (task.Home): its jobs wait in a real Backlog."""

    index = 0

    def __init__(self, limit: int) -> None:
        self.backlog = Backlog(limit, wake=lambda: None)
        self.outcomes: list[str] = []

    def submit(self, task: Task, work: Segment | str) -> None:
        self.backlog.push(Waiting(task, work, time.time()))

    def finished(self, task: Task, outcome: str) -> None:
        self.backlog.drop(task)
        self.outcomes.append(outcome)

    def cancel(self, task: Task) -> None:
        self.backlog.drop(task)

    def take(self, n: int) -> None:
        """A worker takes the next `n` jobs."""
        for _ in range(n):
            item = self.backlog.jobs.pop()
            assert item is not None
            self.backlog.taken(item)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 10))


def seconds(s: float) -> np.ndarray:
    return np.zeros(round(s * RATE), dtype=np.float32)


def make(budget: int = 256 * MIB, limit: int = 1000, seg: tuple[float, float] = (1.0, 0.0),
         source: str = "file") -> tuple[Intake, Transcription, Task, Home]:  # fmt: skip
    intake = Intake(lambda: budget, max_frame=16 * MIB)
    owner = Transcription(intake, partials=False)
    home = Home(limit)
    return intake, owner, Task("t", source, time.time(), home, Segmenter(*seg), owner), home


def test_audio_fed_is_counted_buffered_then_queued_for_the_client_and_the_intake() -> None:
    async def scenario() -> None:
        intake, owner, task, home = make()
        owner.feed(task, seconds(10.5), is_final=False)  # 1 s segments
        assert len(home.backlog) == owner.queued_per_slot[home.backlog, False] == 10
        assert owner.queued_bytes == intake.queued == 10 * RATE * 4
        assert owner.buffered_bytes == intake.buffered == round(0.5 * RATE) * 4
        home.take(4)
        assert owner.queued_bytes == intake.queued == 6 * RATE * 4
        task.cancel()  # the client went away: its jobs are dropped, its buffered audio let go
        assert (owner.queued_bytes, owner.buffered_bytes, intake.held) == (0, 0, 0)
        assert not owner.queued_per_slot.total()

    run(scenario)


def test_more_than_its_segments_waiting_holds_the_client_back_until_they_drain() -> None:
    async def scenario() -> None:
        _, owner, task, home = make()
        owner.feed(task, seconds(MAX_WAITING_SEGMENTS + 1), is_final=True)  # one segment more than the bound
        assert len(home.backlog) == MAX_WAITING_SEGMENTS + 1
        assert owner.blocked_on() is owner.drained and not owner.drained.is_set()
        waiting = asyncio.ensure_future(owner.room(owner.final))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        home.take(1)  # at the bound: read again
        await waiting
        assert owner.blocked_on() is None

    run(scenario)


def test_audio_waiting_is_bounded_buffered_and_queued_together_but_buffered_alone_never_waits() -> None:
    async def scenario() -> None:
        _, owner, task, home = make(seg=(300.0, 0.0))
        owner.feed(task, seconds(290.0), is_final=False)  # all buffered: it cannot drain by waiting
        assert owner.buffered_bytes > MAX_WAITING_AUDIO_BYTES and owner.blocked_on() is None
        owner.feed(task, seconds(20.0), is_final=False)  # a 300 s segment queued, 10 s buffered
        assert len(home.backlog) == 1 and owner.queued_bytes + owner.buffered_bytes > MAX_WAITING_AUDIO_BYTES
        assert owner.blocked_on() is owner.drained and not owner.drained.is_set()
        home.take(1)
        assert owner.drained.is_set() and owner.blocked_on() is None

    run(scenario)


def test_a_full_slot_holds_back_the_clients_with_jobs_waiting_there() -> None:
    async def scenario() -> None:
        _, owner, task, home = make(limit=3)
        owner.feed(task, seconds(3.5), is_final=False)
        assert home.backlog.full() and owner.blocked_on() is home.backlog.room[False]
        waiting = asyncio.ensure_future(owner.room(owner.final))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        home.take(1)
        await waiting

    run(scenario)


def test_waiting_for_room_ends_when_the_client_is_gone() -> None:
    async def scenario() -> None:
        _, owner, task, home = make(limit=1)
        owner.feed(task, seconds(2.5), is_final=False)
        assert owner.blocked_on() is not None
        waiting = asyncio.ensure_future(owner.room(owner.final))
        await asyncio.sleep(0.01)
        task.fail("overloaded", "a test's")  # its error is the request's final answer
        await waiting
        assert owner.final.result()["error"]["code"] == "overloaded"
        assert home.outcomes == ["overloaded"] and len(home.backlog) == 0

    run(scenario)


def test_a_task_that_would_pass_the_clients_buffered_bound_fails() -> None:
    async def scenario() -> None:
        intake, owner, task, home = make(seg=(600.0, 0.0))
        half = seconds(MAX_BUFFERED_AUDIO_BYTES / 2 / 4 / RATE)
        owner.feed(task, half, is_final=False)
        owner.feed(task, half, is_final=False)  # exactly at the bound: taken
        assert not task.done and owner.buffered_bytes == MAX_BUFFERED_AUDIO_BYTES
        owner.feed(task, seconds(0.01), is_final=False)
        assert home.outcomes == ["overloaded"] and "MiB of audio buffered" in owner.final.result()["error"]["message"]
        assert owner.buffered_bytes == intake.held == 0

    run(scenario)


@pytest.mark.parametrize("source", ["file", "mic"])
def test_a_task_that_takes_all_clients_buffered_audio_past_the_intakes_bound_fails_unless_dictation(
    source: str,
) -> None:
    """The intake's bound: the budget less one of the longest frames; a mic task has dictation's
    reserve on top (intake.Intake.buffered_over)."""

    async def scenario() -> None:
        budget = 20 * MIB
        intake, owner, task, home = make(budget=budget, seg=(600.0, 0.0), source=source)
        owner.feed(task, seconds((budget - 16 * MIB + DICTATION_RESERVE_BYTES // 2) / 4 / RATE), is_final=False)
        if source == "mic":
            assert not task.done and intake.buffered > budget - 16 * MIB
        else:
            assert "not yet cut into segments" in owner.final.result()["error"]["message"]
            assert home.outcomes == ["overloaded"] and intake.held == 0

    run(scenario)


def test_audio_read_by_capsd_itself_waits_in_the_intakes_line_and_is_let_go_however_it_ends() -> None:
    async def scenario() -> None:
        intake = Intake(lambda: 64 * MIB, max_frame=16 * MIB)
        async with intake.holding(4 * MIB):  # room: in at once
            assert intake.frames == 4 * MIB
        assert intake.frames == 0

        intake.add(queued=64 * MIB)  # the budget, full
        inside = asyncio.Event()

        async def hold() -> None:
            async with intake.holding(4 * MIB):
                inside.set()
                await asyncio.sleep(3600)

        holder = asyncio.ensure_future(hold())
        await asyncio.sleep(0.01)
        assert not inside.is_set() and intake.status()["connections_waiting"] == 1
        holder.cancel()  # cancelled while waiting: it held nothing, and leaves the line
        await asyncio.gather(holder, return_exceptions=True)
        assert intake.frames == 0 and intake.status()["connections_waiting"] == 0

        holder = asyncio.ensure_future(hold())
        await asyncio.sleep(0.01)
        intake.add(queued=-8 * MIB)  # room: admitted and counted ...
        assert intake.frames == 4 * MIB
        holder.cancel()  # ... and cancelled before it ran: let go all the same
        await asyncio.gather(holder, return_exceptions=True)
        assert intake.frames == 0 and not inside.is_set()

        holder = asyncio.ensure_future(hold())
        await inside.wait()
        assert intake.frames == 4 * MIB
        holder.cancel()
        await asyncio.gather(holder, return_exceptions=True)
        assert intake.held == 56 * MIB

    run(scenario)
