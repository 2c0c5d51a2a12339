"""A task that never ends, against a real capsd: its cost per segment stays the same however long
it runs (docs/design.md#long-tasks), and a dictation alongside is answered as promptly as ever."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psutil
import pytest

from capsd.selftest.tones import synth
from tests.support.checks import accepted_per_second, dictate
from tests.support.client import connect, stream_endless

pytestmark = pytest.mark.integration

STREAM_S = 60.0
STRETCH_S = 20.0  # the first and the last stretch compared
FRAME_S = 10.0
DICTATION_S = 1.0  # the brief's bound for a dictation's answer, already several times what it takes


def test_an_endless_task_is_accepted_as_fast_at_its_end_as_at_its_start(start_capsd: Any) -> None:
    """1 s segments of dense digits, never final, sent as fast as capsd reads them. Before partial
    frames were rate-limited and merged incrementally, every segment cost O(task): the audio
    accepted per second fell to a fifth within 90 s and the supervisor spent a core on it."""
    capsd = start_capsd({"workers": {"count": 2}})
    minute, _ = synth("1234567890" * 12)
    sent: list[tuple[float, float]] = []  # (time.monotonic(), audio seconds sent so far)
    waits: list[float] = []
    received = [0]

    async def read(ws: Any) -> None:
        async for message in ws:  # partial frames: counted, not parsed (the client's CPU is ours)
            received[0] += len(message)

    async def dictations(until: float) -> None:
        n = 0
        while time.monotonic() < until:
            await asyncio.sleep(4)
            began = time.monotonic()
            await dictate(capsd.url, f"dictation-{n}", within=DICTATION_S)
            waits.append(time.monotonic() - began)
            n += 1

    async def scenario() -> None:
        async with connect(capsd.url) as ws:
            start = time.monotonic()
            reader = asyncio.create_task(read(ws))
            stream = stream_endless(ws, "endless", minute, start + STREAM_S, sent, FRAME_S, (1, 0.5))
            await asyncio.gather(stream, dictations(start + STREAM_S))
            reader.cancel()

    supervisor = psutil.Process(capsd.proc.pid)
    cpu = sum(supervisor.cpu_times()[:2])
    began = time.monotonic()
    asyncio.run(scenario())
    cpu = sum(supervisor.cpu_times()[:2]) - cpu
    first, last = accepted_per_second(sent, STRETCH_S)
    print(f"\naudio accepted per second: first {first:.1f}, last {last:.1f}; supervisor CPU {cpu:.1f} s in "
          f"{time.monotonic() - began:.0f} s; {received[0] >> 20} MiB of results; dictations {waits}")  # fmt: skip
    assert last >= first / 2, (first, last)
    assert len(waits) >= 5
