"""The intake: what all connections together make the supervisor hold is bounded by the memory
plan (docs/design.md#intake). In-process tests of its rules, then real abusers against a real
capsd with dictations alongside on every slot."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest
from websockets.frames import Frame, Opcode

from capsd.memory import DICTATION_RESERVE_BYTES, MIB
from capsd.selftest.tones import synth
from capsd.supervisor.intake import SMALL_FRAME_BYTES, Intake, frame_size
from tests.support.checks import (
    GOOD_DIGITS,
    PROMPT_S,
    assert_exact,
    dictate,
    task_ids,
    task_outcomes,
    wait_for,
)
from tests.support.client import connect, frame, receive

# -- the rules, in-process ----------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("length", [0, 125, 126, 65535, 65536, 5 * MIB])
def test_a_frames_length_is_read_from_its_header_alone(length: int) -> None:
    wire = Frame(Opcode.TEXT, b"x" * length).serialize(mask=True)
    length_ends = 2 if length < 126 else 4 if length < 2**16 else 10  # then the mask's 4 bytes
    for cut in range(length_ends):
        assert frame_size(wire[:cut]) is None
    assert frame_size(wire[:length_ends]) == frame_size(wire) == (len(wire), True, True)
    assert frame_size(Frame(Opcode.PING, b"p").serialize(mask=True)) == (2 + 4 + 1, False, True)
    assert frame_size(Frame(Opcode.TEXT, b"a", fin=False).serialize(mask=True))[2] is False  # type: ignore[index]


class Meter:
    """A connection as the intake sees it: the frame it waits with, and when it came in."""

    def __init__(self, name: str, size: int, admitted: list[str]) -> None:
        self.name, self.next_size, self.log = name, size, admitted

    def admitted(self) -> None:
        self.log.append(self.name)


def intake(budget: int = 64 * MIB) -> Intake:
    return Intake(lambda: budget, max_frame=16 * MIB)


@pytest.mark.unit
def test_long_frames_come_in_while_the_budget_has_room_then_oldest_first() -> None:
    admitted: list[str] = []
    bound = intake()
    a, b, c = (Meter(name, 30 * MIB, admitted) for name in "abc")
    assert bound.admit(a, a.next_size, small=False)
    assert bound.admit(b, b.next_size, small=False)
    assert not bound.admit(c, c.next_size, small=False)  # 90 MiB would be held
    late = Meter("late", 1 * MIB, admitted)
    assert not bound.admit(late, late.next_size, small=False)  # it fits, but c came first
    bound.add(frames=-30 * MIB)  # a's frame is parsed and its audio decoded
    assert admitted == ["c", "late"]
    assert bound.held == 61 * MIB and bound.status()["connections_waiting"] == 0


@pytest.mark.unit
def test_small_frames_pass_long_ones_and_have_a_reserve_of_their_own() -> None:
    admitted: list[str] = []
    bound = intake()
    bound.add(queued=64 * MIB)  # the budget, full
    assert not bound.admit(Meter("file", 5 * MIB, admitted), 5 * MIB, small=False)
    mic = Meter("mic", SMALL_FRAME_BYTES, admitted)
    for _ in range(DICTATION_RESERVE_BYTES // SMALL_FRAME_BYTES):
        assert bound.admit(mic, SMALL_FRAME_BYTES, small=True)
    assert not bound.admit(mic, SMALL_FRAME_BYTES, small=True)  # the reserve is full too
    bound.add(frames=-SMALL_FRAME_BYTES)
    assert admitted == ["mic"]  # small frames first; the long one still waits
    bound.add(queued=-64 * MIB)
    assert admitted == ["mic", "file"]


@pytest.mark.unit
def test_a_frame_comes_in_whenever_nothing_held_can_drain() -> None:
    bound = intake()
    bound.add(buffered=64 * MIB)  # audio not yet cut: only its clients' next frames cut it
    assert bound.admit(Meter("next", 16 * MIB, []), 16 * MIB, small=False)
    bound.add(frames=-16 * MIB, queued=1)  # once a segment waits, what is held drains by itself
    assert not bound.admit(Meter("then", 16 * MIB, []), 16 * MIB, small=False)


@pytest.mark.unit
def test_audio_not_yet_cut_leaves_room_for_the_longest_frame_and_dictation_has_the_reserve() -> None:
    bound = intake()
    bound.add(buffered=64 * MIB - 16 * MIB)
    assert not bound.buffered_over(urgent=False)
    bound.add(buffered=1)
    assert bound.buffered_over(urgent=False) and not bound.buffered_over(urgent=True)
    bound.add(buffered=DICTATION_RESERVE_BYTES)
    assert bound.buffered_over(urgent=True)


# -- real abusers against a real capsd ----------------------------------------------------------


@pytest.mark.integration
def test_many_abusers_at_once_are_held_to_the_plan_and_dictation_on_every_slot_stays_exact(start_capsd: Any) -> None:
    """16 connections stream 60 s frames of tasks that never end, over both slots, as fast as capsd
    reads them; dictations go on on every slot meanwhile. Together the abusers would hold 16 times
    a connection's bounds (the issue measured 582 MiB against a plan of 120); the intake holds them
    to its budget, and the supervisor stays within its share of the memory plan."""
    capsd = start_capsd({"workers": {"count": 2}})
    minute, _ = synth("1234567890" * 12)
    abusers = [f"{task_id}-{n}" for n in range(8) for task_id in task_ids(2, f"abuser{n}")]
    connections: list[Any] = []

    async def abuse(task_id: str) -> None:
        connections.append(ws := await connect(capsd.url))
        message = frame(task_id, minute, False, "file", (25, 2))
        while True:
            await ws.send(message)  # waits while capsd does not read: TCP backpressure

    async def scenario() -> None:
        streams = [asyncio.create_task(abuse(task_id)) for task_id in abusers]
        held_back = lambda: capsd.status()["intake"]["connections_waiting"] > 0  # noqa: E731
        await asyncio.to_thread(wait_for, held_back, 60, "connections held back by the intake")
        for n in range(3):
            for task_id in task_ids(2, f"good{n}"):
                await dictate(capsd.url, task_id)  # exact, and within PROMPT_S
        for stream in streams:
            stream.cancel()
        for ws in connections:
            ws.transport.abort()

    asyncio.run(scenario())
    intake = capsd.status()["intake"]
    assert intake["peak_bytes"] <= intake["budget_bytes"] + 16 * MIB, intake  # one frame over, at most
    assert capsd.peak_rss() <= capsd.plan().supervisor_bytes, capsd.peak_rss() >> 20
    wait_for(lambda: capsd.status()["intake"]["held_bytes"] == 0, what="every abuser's audio let go")


@pytest.mark.integration
def test_audio_not_yet_cut_is_bounded_for_the_whole_daemon(start_capsd: Any) -> None:
    """Tasks whose audio waits uncut (170 s each, below the 178 s a 60/59 segment needs) on two
    connections, each within its own 32 MiB: together over the intake's bound for audio not yet
    cut (its budget, 48 MiB with one worker, less one 16 MiB frame), so the tasks that would take
    it further fail with overloaded, naming the bound. The others, and a dictation meanwhile (it
    has the reserve), are exact."""
    capsd = start_capsd()
    digits = "1234567890" * 34
    samples, starts = synth(digits)  # 10.9 MB of float32 each
    first, second = ["first-0", "first-1", "first-2"], ["second-0", "second-1", "second-2"]

    async def hoard(ws: Any, ids: list[str]) -> None:
        for task_id in ids:
            await ws.send(frame(task_id, samples, False, "file", (60, 59)))

    async def scenario() -> dict[str, Any]:
        async with connect(capsd.url) as one, connect(capsd.url) as two:
            await hoard(one, first)
            await asyncio.to_thread(wait_for, lambda: capsd.status()["intake"]["held_bytes"] >= 3 * samples.nbytes)
            await hoard(two, second)
            await asyncio.to_thread(wait_for, lambda: task_outcomes(capsd).get("overloaded", 0) >= 3)
            await dictate(capsd.url, "dictation")
            for ws, ids in ((one, first), (two, second)):
                for task_id in ids:
                    await ws.send(frame(task_id, samples[:0], True, "file", (60, 59)))
            frames = await receive(one, set(first))
            frames.update(await receive(two, set(second)))
            return frames

    frames = asyncio.run(scenario())
    refused = sorted(t for t, f in frames.items() if "error" in f[-1])
    assert refused == second, refused
    for task_id in refused:
        assert frames[task_id][-1]["error"]["code"] == "overloaded"
        assert "not yet cut into segments" in frames[task_id][-1]["error"]["message"]
    for task_id in first:
        assert_exact(frames[task_id], digits, starts)


@pytest.mark.integration
def test_a_dictation_is_answered_while_files_hold_the_whole_budget(start_capsd: Any) -> None:
    """File clients hold the intake's budget with the worker stopped, so nothing drains and long
    frames wait; a dictation's small frames still come in (they have a reserve of their own), and
    once the worker goes on it is answered exact and promptly."""
    capsd = start_capsd({"workers": {"heartbeat_timeout_s": 300}})  # the worker is stopped, not hung
    minute, _ = synth("1234567890" * 12)
    worker = capsd.worker_pid(0)
    samples, starts = synth(GOOD_DIGITS)

    async def stream(task_id: str) -> None:
        async with connect(capsd.url, close_timeout=1) as ws:
            for _ in range(20):
                await ws.send(frame(task_id, minute, False, "file", (25, 2)))

    def budget_full() -> bool:
        intake = capsd.status()["intake"]
        return intake["connections_waiting"] > 0 and intake["held_bytes"] > intake["budget_bytes"] - 8 * MIB

    async def scenario() -> float:
        os.kill(worker, signal.SIGSTOP)
        streams = [asyncio.create_task(stream(f"file-{n}")) for n in range(6)]
        try:
            await asyncio.to_thread(wait_for, budget_full, 60, "the budget held by files")
            async with connect(capsd.url) as ws:
                for start in range(0, len(samples), 1600):
                    await ws.send(frame("dictation", samples[start : start + 1600], False, "mic", (15, 2)))
                await ws.send(frame("dictation", samples[:0], True, "mic", (15, 2)))
                await asyncio.to_thread(time.sleep, 1)  # the dictation is read and queued meanwhile
                os.kill(worker, signal.SIGCONT)
                sent = time.monotonic()
                final = await receive(ws, {"dictation"})
                waited = time.monotonic() - sent
            assert_exact(final["dictation"], GOOD_DIGITS, starts)
            return waited
        finally:
            os.kill(worker, signal.SIGCONT)
            for s in streams:
                s.cancel()

    assert asyncio.run(scenario()) < PROMPT_S

