"""What CapsWriter clients v1.0-v2.6 see: error frames only after their own final frame, the
`binary` subprotocol, frames too big for the limit (a real capsd, real workers)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from capsd.selftest.tones import synth, token_digits
from tests.support.checks import FRAME_FIELDS, assert_exact, dictate, stop_while_decoding, task_outcomes, wait_for
from tests.support.client import connect, frame, receive, send_file, send_mic

pytestmark = pytest.mark.integration


async def nothing_within(ws: Any, seconds: float) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(ws.recv(), seconds)


def test_a_dictation_whose_worker_dies_is_answered_after_its_final_frame(start_capsd: Any, heavy_model: Path) -> None:
    capsd = start_capsd({"model": {"dir": str(heavy_model)}})
    samples, _ = synth("1234567890" * 8)  # 40 s: the first 15/2 segment is cut at 19 s
    step = 1600

    async def scenario() -> list[dict[str, Any]]:
        async with connect(capsd.url) as ws:
            for i in range(0, 20 * 16000, step):
                await ws.send(frame("speaking", samples[i : i + step], False, "mic", (15, 2)))
            await asyncio.to_thread(wait_for, lambda: capsd.status()["slots"][0]["state"] == "busy", 30, "busy")
            os.kill(capsd.worker_pid(0), signal.SIGKILL)  # mid-decode of the dictation's segment
            await asyncio.to_thread(wait_for, lambda: "worker exited" in capsd.logs(), 30, "the death seen")
            await nothing_within(ws, 1.0)  # the user is still speaking: no final frame yet
            for i in range(20 * 16000, len(samples), step):
                await ws.send(frame("speaking", samples[i : i + step], False, "mic", (15, 2)))
            await ws.send(frame("speaking", samples[:0], True, "mic", (15, 2)))
            return (await receive(ws, {"speaking"}))["speaking"]

    frames = asyncio.run(scenario())
    assert len(frames) == 1
    final = frames[0]
    assert final["is_final"] and final["error"]["code"] == "worker_crashed" and FRAME_FIELDS <= final.keys()


def test_a_task_refused_while_stopping_is_answered_after_its_final_frame(start_capsd: Any, heavy_model: Path) -> None:
    """v1.0 renames the task's audio file when the final frame comes: not before it has written it."""
    capsd = start_capsd({"model": {"dir": str(heavy_model)}})
    long_file, starts = synth("1234567890" * 8)  # 40 s: a few seconds of decoding keep the stop waiting
    mic, _ = synth("42")

    async def scenario() -> dict[str, Any]:
        async with connect(capsd.url) as ws:
            await stop_while_decoding(capsd, ws, long_file)
            await ws.send(frame("too-late", mic[:1600], False, "mic", (15, 2)))
            await asyncio.to_thread(wait_for, lambda: "task refused" in capsd.logs(), 30, "the refusal")
            await send_mic(ws, "too-late", mic[1600:])
            return await receive(ws, {"finishing", "too-late"})

    frames = asyncio.run(scenario())
    assert_exact(frames["finishing"], "1234567890" * 8, starts)
    refused = frames["too-late"]
    assert len(refused) == 1 and refused[0]["error"]["code"] == "shutting_down"
    assert refused[0]["time_submit"] == refused[0]["time_complete"] > 0
    assert capsd.proc.wait(30) == 0


@pytest.mark.parametrize("offered", [["binary"], None])
def test_the_binary_subprotocol_is_echoed_and_not_required(start_capsd: Any, offered: list[str] | None) -> None:
    capsd = start_capsd()
    samples, starts = synth("2026")

    async def scenario() -> tuple[str | None, dict[str, Any]]:
        async with connect(capsd.url, subprotocols=offered) as ws:
            await send_mic(ws, "dictation", samples)
            return ws.subprotocol, await receive(ws, {"dictation"})

    subprotocol, frames = asyncio.run(scenario())
    assert subprotocol == (offered[0] if offered else None)
    assert_exact(frames["dictation"], "2026", starts)


def test_a_frame_over_max_message_bytes_is_logged_and_its_connections_tasks_counted_failed(start_capsd: Any) -> None:
    """websockets closes the connection with 1009 for capsd: one log line with the peer and the
    limit; the task open on it is cancelled and counted failed (connection_closed), in status and
    metrics alike; a dictation alongside is exact."""
    capsd = start_capsd({"server": {"max_message_bytes": 2**20}})
    samples, _ = synth("1234567890" * 3)  # 15 s: 1.28 MB of base64

    async def scenario() -> int | None:
        async with connect(capsd.url) as ws:
            await ws.send(frame("open", samples[:1600], False, "mic", (15, 2)))
            await ws.send(frame("whole-file", samples, True, "file", (15, 2)))
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 30)
        await dictate(capsd.url, "dictation")
        return closed.value.rcvd.code if closed.value.rcvd else None

    assert asyncio.run(scenario()) == 1009
    wait_for(lambda: "frame too big" in capsd.logs(), 10, "the log line")
    [line] = [line for line in capsd.logs().splitlines() if "connection closed by capsd" in line]
    assert "frame too big" in line and "code=1009" in line and "tasks=1" in line
    assert "max_message_bytes=1048576" in line and "peer=" in line
    assert [s["tasks_failed"] for s in capsd.status()["slots"]] == [1]
    assert task_outcomes(capsd) == {"done": 1, "connection_closed": 1}


def test_a_protocol_error_closes_the_connection_logged_and_its_tasks_counted_failed(start_capsd: Any) -> None:
    """A text frame that is not UTF-8: websockets closes with 1007 for capsd; logged once, the task
    open on the connection counted failed (connection_closed); a dictation alongside is exact."""
    capsd = start_capsd()

    async def scenario() -> int | None:
        async with connect(capsd.url) as ws:
            await ws.send(frame("open", synth("1")[0][:1600], False, "mic", (15, 2)))
            await ws.send(b'{"task_id": "\xff"}', text=True)  # a text frame, as bytes: not checked here
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 30)
        await dictate(capsd.url, "dictation")
        return closed.value.rcvd.code if closed.value.rcvd else None

    assert asyncio.run(scenario()) == 1007
    wait_for(lambda: "connection closed by capsd" in capsd.logs(), 10, "the log line")
    [line] = [line for line in capsd.logs().splitlines() if "connection closed by capsd" in line]
    assert "code=1007" in line and "tasks=1" in line and "peer=" in line
    assert [s["tasks_failed"] for s in capsd.status()["slots"]] == [1]
    assert task_outcomes(capsd) == {"done": 1, "connection_closed": 1}


def test_a_file_client_asking_for_90_s_segments_is_served_60(start_capsd: Any) -> None:
    """CapsWriter's own server served any seg_duration; capsd serves above 60 s as 60 (a worker's
    memory is planned for it) and says so once per connection, at info."""
    capsd = start_capsd()
    digits = "1234567890" * 30  # 150 s: 3 frames of 60 s, segments of 62 s
    samples, starts = synth(digits)

    async def scenario() -> dict[str, Any]:
        async with connect(capsd.url, subprotocols=["binary"]) as ws:
            for task_id in ("ninety", "again"):
                await send_file(ws, task_id, samples, seg=(90, 2))
            return await receive(ws, {"ninety", "again"})

    frames = asyncio.run(scenario())
    asyncio.run(dictate(capsd.url, "dictation"))
    assert_exact(frames["ninety"], digits, starts)
    assert_exact(frames["again"], digits, starts)
    [line] = [line for line in capsd.logs().splitlines() if "seg_duration served as" in line]
    assert "[info" in line and "asked=90" in line and "served=60" in line and "peer=" in line


def test_v1_sends_a_whole_file_as_one_frame(start_capsd: Any) -> None:
    capsd = start_capsd()
    digits = "1234567890" * 30
    samples, starts = synth(digits)  # 150 s: 12.8 MB of base64 in one frame, under the 16 MiB default

    async def scenario() -> dict[str, Any]:
        async with connect(capsd.url) as ws:
            await ws.send(frame("v1-file", samples, True, "file", (25, 2)))
            return await receive(ws, {"v1-file"})

    assert_exact(asyncio.run(scenario())["v1-file"], digits, starts)


def test_mic_frames_of_50_ms_and_an_empty_final_frame(start_capsd: Any) -> None:
    capsd = start_capsd()
    digits = "31415926535897932384"
    samples, starts = synth(digits)

    async def scenario() -> dict[str, Any]:
        async with connect(capsd.url, subprotocols=["binary"]) as ws:
            await send_mic(ws, "v2-mic", samples, frame_s=0.05)
            return await receive(ws, {"v2-mic"})

    assert_exact(asyncio.run(scenario())["v2-mic"], digits, starts)


@pytest.mark.parametrize("fmt", [{"num": False, "spell": False}, {"num": True, "spell": True}])
def test_text_accu_and_its_tokens_line_up_formatted_or_not(start_capsd: Any, fmt: dict[str, bool]) -> None:
    """With [format] num off the final text keeps its numerals and the tokens are those
    recognised; with it on both text and text_accu are digits, one token per digit at its time."""
    capsd = start_capsd({"format": fmt})
    digits = "1122334455667788990012" * 3
    samples, starts = synth(digits)

    async def scenario() -> dict[str, Any]:
        async with connect(capsd.url) as ws:
            await send_file(ws, "file", samples, seg=(15, 2))
            return await receive(ws, {"file"})

    frames = asyncio.run(scenario())["file"]
    final = frames[-1]
    assert final["text"] == final["text_accu"] and final["is_final"]
    assert "".join(final["tokens"]) == final["text_accu"]
    assert len(final["timestamps"]) == len(final["tokens"])
    assert max(abs(a - b) for a, b in zip(final["timestamps"], starts)) < 0.1
    if fmt["num"]:
        assert final["text_accu"] == digits
    else:
        assert token_digits(final["text_accu"]) == digits  # the numerals as recognised
        assert final["tokens"] == list(final["text_accu"])
