"""capsd serving CapsWriter clients: a real daemon, real workers, real sherpa-onnx, real sockets."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.exceptions import InvalidStatus

from capsd.models import EMBEDDED_MODEL_DIR
from capsd.selftest.tones import synth, token_digits, write_wav
from tests.support.checks import FRAME_FIELDS, assert_exact, run_client, task_ids, wait_for
from tests.support.client import connect, frame, receive, send_file, send_mic

pytestmark = pytest.mark.integration

# Equal digits straddle many segment boundaries: every slot of 0.5 s holds a tone, so both
# copies of a repeated digit lie around each overlap's cut.
DIGITS = "1122334455667788990012" * 6  # 132 digits, 66 s


def test_file_and_mic_clients_long_tasks_exact(start_capsd: Any) -> None:
    capsd = start_capsd()
    samples, starts = synth(DIGITS)
    frames = asyncio.run(
        run_client(capsd.url, [("file-1", "file", samples, (25, 2)), ("mic-1", "mic", samples, (15, 2))])
    )
    assert_exact(frames["file-1"], DIGITS, starts)
    assert_exact(frames["mic-1"], DIGITS, starts)
    # partial results while the task runs: sent unpaced, its segments decode faster than the
    # partial frames' rate (at most two a second: docs/design.md#long-tasks), so at least one
    assert len(frames["mic-1"]) >= 2


def test_interleaved_tasks_on_one_connection_keep_their_audio_apart(start_capsd: Any) -> None:
    capsd = start_capsd()
    a, a_starts = synth("1234567890" * 4)
    b, b_starts = synth("9876543210" * 4)

    async def interleave() -> dict[str, Any]:
        async with connect(capsd.url) as ws:
            step = 1600
            for i in range(0, max(len(a), len(b)), step):
                await ws.send(frame("a", a[i : i + step], False, "mic", (15, 2)))
                await ws.send(frame("b", b[i : i + step], False, "mic", (15, 2)))
            await ws.send(frame("a", a[:0], True, "mic", (15, 2)))
            await ws.send(frame("b", b[:0], True, "mic", (15, 2)))
            return await receive(ws, {"a", "b"})

    frames = asyncio.run(interleave())
    assert_exact(frames["a"], "1234567890" * 4, a_starts)
    assert_exact(frames["b"], "9876543210" * 4, b_starts)


def test_concurrent_tasks_on_both_slots_come_back_exact(start_capsd: Any) -> None:
    capsd = start_capsd({"workers": {"count": 2}})
    ids = task_ids(2)
    samples, starts = synth(DIGITS[:80])

    async def both() -> list[dict[str, Any]]:
        return await asyncio.gather(*(run_client(capsd.url, [(task_id, "file", samples, (15, 2))]) for task_id in ids))

    for task_id, frames in zip(ids, asyncio.run(both())):
        assert_exact(frames[task_id], DIGITS[:80], starts)
    slots = capsd.status()["slots"]
    assert [s["tasks_done"] for s in slots] == [1, 1]
    assert len({s["pid"] for s in slots}) == 2


def bad_frames() -> list[tuple[str, str | None]]:
    """Each malformed kind of docs/design.md#the-protocol, with the task_id its error frame carries."""
    good = json.loads(frame("bad", np.zeros(160, np.float32), True, "mic", (15, 2)))

    def mutate(**changes: Any) -> str:
        return json.dumps({k: v for k, v in {**good, **changes}.items() if v is not ...})

    return [
        ("not json {", None),
        ("[1, 2]", None),
        (mutate(task_id=...), None),
        (mutate(task_id=17), None),
        (mutate(source=...), "bad"),
        (mutate(source="radio"), "bad"),
        (mutate(is_final="yes"), "bad"),
        (mutate(data="!!!not base64"), "bad"),
        (mutate(data=base64.b64encode(b"abcde").decode()), "bad"),
        (mutate(seg_duration=0), "bad"),
        (mutate(seg_duration=-5), "bad"),
        (mutate(seg_duration=90, seg_overlap=60), "bad"),  # 90 is served as 60: the overlap is not below it
        (mutate(seg_overlap=15), "bad"),
        (mutate(seg_overlap=-1), "bad"),
        (mutate(time_start="now"), "bad"),
        (mutate(task_id="\ud800"), None),  # a lone surrogate: not valid Unicode
        (mutate(data=base64.b64encode(np.array([np.nan], np.float32).tobytes()).decode()), "bad"),
        (mutate(data=base64.b64encode(np.array([np.inf], np.float32).tobytes()).decode()), "bad"),
        (json.dumps(good).replace('"time_start": ', '"time_start": NaN, "x": '), "bad"),
    ]


def test_every_malformed_frame_gets_a_complete_error_and_the_connection_goes_on(start_capsd: Any) -> None:
    capsd = start_capsd()
    samples, starts = synth("314159")
    cases = bad_frames()

    async def session() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        errors = []
        async with connect(capsd.url) as ws:
            for raw, task_id in cases:
                await ws.send(raw)
                if task_id and '"is_final": true' not in raw:  # its error frame waits for the final frame
                    with pytest.raises(asyncio.TimeoutError):
                        await asyncio.wait_for(ws.recv(), 0.5)
                    await ws.send(frame(task_id, samples[:0], True, "mic", (15, 2)))
                errors.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
            await send_mic(ws, "good", samples)
            return errors, await receive(ws, {"good"})

    errors, frames = asyncio.run(session())
    for (raw, task_id), error in zip(cases, errors):
        assert FRAME_FIELDS <= error.keys(), raw
        assert error["is_final"] and error["text"] == "" and error["task_id"] == task_id, raw
        assert error["error"]["code"] == "bad_request" and error["error"]["message"], raw
        # When capsd answered; time_start the frame's own where it could be read, else the same.
        assert error["time_submit"] == error["time_complete"] > 0, raw
        sent = json.loads(raw, parse_constant=lambda _: None) if raw.startswith("{") else {}
        readable = isinstance(sent.get("time_start"), float)
        assert error["time_start"] == (sent["time_start"] if readable else error["time_complete"]), raw
    assert_exact(frames["good"], "314159", starts)


def test_seg_duration_zero_cannot_stall_the_server(start_capsd: Any) -> None:
    capsd = start_capsd()
    samples, starts = synth("2718")

    async def session() -> dict[str, Any]:
        async with connect(capsd.url) as ws:
            for seg in [(0, 0), (-1, 2), (0.0, 0.0)]:
                await ws.send(frame("zero", np.ones(16000, np.float32), False, "mic", seg))
            await send_file(ws, "after", samples)
            await ws.send(frame("zero", samples[:0], True, "mic", (15, 2)))
            return await receive(ws, {"zero", "after"}, timeout=30)

    frames = asyncio.run(session())
    assert len(frames["zero"]) == 1 and frames["zero"][0]["error"]["code"] == "bad_request"
    assert_exact(frames["after"], "2718", starts)


def test_a_60_s_file_frame_passes(start_capsd: Any) -> None:
    capsd = start_capsd()
    samples, starts = synth("1234567890" * 12)  # 60.2 s: 5.1 MB of base64 in one frame
    frames = asyncio.run(run_client(capsd.url, [("big", "file", samples, (25, 2))]))
    assert_exact(frames["big"], "1234567890" * 12, starts)


def test_closed_connection_cancels_its_tasks_and_frees_worker_state(start_capsd: Any) -> None:
    capsd = start_capsd()
    samples, _ = synth("5" * 100)

    async def abandon() -> None:
        async with connect(capsd.url) as ws:
            await send_mic(ws, "gone", samples[: 40 * 16000])  # ends with the final frame; close at once
        async with connect(capsd.url) as ws:
            step = 16000
            for i in range(0, 40 * 16000, step):
                await ws.send(frame("open", samples[i : i + step], False, "mic", (15, 2)))

    asyncio.run(abandon())
    for _ in range(100):
        slot = capsd.status()["slots"][0]
        if slot["queue_depth"] == 0 and slot["tasks_in_progress"] == 0 and slot["state"] == "ready":
            break
        asyncio.run(asyncio.sleep(0.1))
    assert slot["tasks_in_progress"] == 0 and slot["queue_depth"] == 0
    # The daemon still serves exactly afterwards.
    frames = asyncio.run(run_client(capsd.url, [("after", "file", *synth("42")[:1], (15, 2))]))
    assert token_digits(frames["after"][-1]["tokens"]) == "42"


@pytest.mark.parametrize("rate", [16000, 44100])
def test_capsctl_transcribes_a_wav_exactly_and_shows_the_status(start_capsd: Any, tmp_path: Path, rate: int) -> None:
    capsd = start_capsd()
    samples, _ = synth("8675309", rate=rate)
    write_wav(str(tmp_path / "tones.wav"), samples, rate)
    ctl = [sys.executable, "-m", "capsd.ctl"]
    done = subprocess.run(
        [*ctl, "--url", capsd.url, "transcribe", str(tmp_path / "tones.wav")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "8675309"
    table = subprocess.run([*ctl, "--socket", str(capsd.socket), "status"], capture_output=True, text=True)
    assert table.returncode == 0 and "ready" in table.stdout
    status = json.loads(
        subprocess.run([*ctl, "--socket", str(capsd.socket), "status", "--json"], capture_output=True, text=True).stdout
    )
    assert status["state"] == "ready" and status["slots"][0]["tasks_done"] == 1
    assert set(status["slots"][0]) == {"slot", "pid", "state", "rss_bytes", "private_bytes", "shared_bytes",
                                       "started", "queue_depth", "tasks_in_progress",
                                       "tasks_done", "tasks_failed", "restarts", "last_exit", "uptime_s",
                                       "segments_decoded", "busy_share", "cpu_share", "rtf", "model"}  # fmt: skip
    assert status["retries"] == {"retried": 0, "poison_jobs": 0, "paused": False}
    assert status["slots"][0]["model"] == {"type": "paraformer", "dir": str(EMBEDDED_MODEL_DIR), "punctuation": ""}
    assert status["memory"]["planned_bytes"] > 0 and status["memory"]["available_bytes"] > 0
    missing = subprocess.run([*ctl, "--socket", str(tmp_path / "nope.sock"), "status"], capture_output=True, text=True)
    assert missing.returncode == 69 and "not running" in missing.stderr
    bad_slot = subprocess.run(
        [*ctl, "--socket", str(capsd.socket), "restart-worker", "5"], capture_output=True, text=True
    )
    assert bad_slot.returncode == 65 and "no slot 5" in bad_slot.stderr
    assert capsd.stop() == 0


def test_sighup_applies_what_it_can_and_names_what_needs_a_restart(start_capsd: Any) -> None:
    capsd = start_capsd({"workers": {"queue_limit": 10}})
    text = capsd.config_path.read_text().replace("queue_limit = 10", "queue_limit = 20\nthreads = 2")
    capsd.config_path.write_text(text)
    capsd.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "config changes need a restart" in capsd.logs())
    assert "[workers] queue_limit" in capsd.logs() and "[workers] threads" in capsd.logs()
    capsd.config_path.write_text(text.replace("queue_limit = 20", "queue_limit = 0"))
    capsd.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in capsd.logs())
    samples, starts = synth("777")
    assert_exact(asyncio.run(run_client(capsd.url, [("still", "mic", samples, (15, 2))]))["still"], "777", starts)


def test_full_queue_refuses_new_file_tasks_with_overloaded_takes_dictation_and_loses_nothing(start_capsd: Any) -> None:
    """A slot full of file segments refuses new file tasks; the connection filling it is not read
    until there is room; a dictation still gets in (docs/design.md#dictation-first)."""
    capsd = start_capsd({"workers": {"queue_limit": 4}})
    digits = "1234567890" * 12
    samples, starts = synth(digits)  # 60 s: 4 segments of 15/2
    short, short_starts = synth("1812")
    worker = capsd.worker_pid(0)
    os.kill(worker, signal.SIGSTOP)  # nothing drains: the queue fills for certain
    try:

        async def fill() -> dict[str, Any]:
            async with connect(capsd.url) as ws:
                await send_file(ws, "long-0", samples, seg=(15, 2))
                await send_file(ws, "long-1", samples, seg=(15, 2))
                await asyncio.to_thread(wait_for, lambda: capsd.status()["slots"][0]["queue_depth"] >= 4, 30)
                refused = await run_client(capsd.url, [("refused", "file", samples[:32000], (15, 2))])
                dictation = asyncio.create_task(run_client(capsd.url, [("dictation", "mic", short, (15, 2))]))
                await asyncio.to_thread(wait_for, lambda: capsd.status()["slots"][0]["queue_depth"] >= 5, 30)
                os.kill(worker, signal.SIGCONT)
                return await receive(ws, {"long-0", "long-1"}) | refused | await dictation

        frames = asyncio.run(fill())
    finally:
        os.kill(worker, signal.SIGCONT)
    assert frames["refused"][-1]["error"]["code"] == "overloaded" and FRAME_FIELDS <= frames["refused"][-1].keys()
    for task_id in ("long-0", "long-1"):
        assert_exact(frames[task_id], digits, starts)
    assert_exact(frames["dictation"], "1812", short_starts)
    assert capsd.status()["slots"][0]["restarts"] == 0 and capsd.proc.poll() is None


def test_max_connections_refuses_the_rest_with_503(start_capsd: Any) -> None:
    capsd = start_capsd({"server": {"max_connections": 8}})

    async def crowd() -> list[Any]:
        async def one() -> Any:
            try:
                return await connect(capsd.url)
            except InvalidStatus as e:
                return e.response.status_code

        results = await asyncio.gather(*(one() for _ in range(20)))
        for r in results:
            if not isinstance(r, int):
                await r.close()
        return results

    results = asyncio.run(crowd())
    assert sum(not isinstance(r, int) for r in results) == 8
    assert [r for r in results if isinstance(r, int)] == [503] * 12


def test_dictation_is_served_before_waiting_file_segments(start_capsd: Any, heavy_model: Path) -> None:
    capsd = start_capsd({"model": {"dir": str(heavy_model)}})
    file_digits, mic_digits = "1234567890" * 18, "4711"
    file_audio, file_starts = synth(file_digits)  # 90 s: 6 segments of ~0.8 s decoding each
    mic_audio, mic_starts = synth(mic_digits)

    async def session() -> dict[str, Any]:
        async with connect(capsd.url) as ws:
            await send_file(ws, "batch", file_audio, seg=(15, 2))
            await send_mic(ws, "dictation", mic_audio)
            return await receive(ws, {"batch", "dictation"})

    frames = asyncio.run(session())
    assert_exact(frames["batch"], file_digits, file_starts)
    assert_exact(frames["dictation"], mic_digits, mic_starts)
    # The mic task's result came while the file still had segments waiting.
    assert frames["dictation"][-1]["time_complete"] < frames["batch"][-2]["time_complete"]


@pytest.mark.parametrize(("source", "seg"), [("mic", (15, 2)), ("file", (25, 2)), ("mic", (4, 1))])
def test_one_digit_repeated_across_every_boundary_is_kept_exactly(start_capsd: Any, source: str, seg: Any) -> None:
    """Every overlap of this task is cut between two equal tokens (docs/design.md#boundary-de-duplication-deletes-repeats)."""
    capsd = start_capsd()
    digits = "7" * 100
    samples, starts = synth(digits)
    frames = asyncio.run(run_client(capsd.url, [("sevens", source, samples, seg)]))
    assert_exact(frames["sevens"], digits, starts)


def test_audio_buffered_on_one_connection_is_bounded(start_capsd: Any) -> None:
    """front.MAX_BUFFERED_AUDIO_BYTES (32 MiB): a task that would pass it fails, the others go on."""
    capsd = start_capsd()
    digits = "1234567890" * 34
    samples, starts = synth(digits)  # 170 s: below the 178 s a 60/59 segment needs, so all of it waits
    ids = [f"hoard-{i}" for i in range(5)]  # 5 x 10.9 MB of float32: the fourth and fifth do not fit

    async def hoard() -> dict[str, Any]:
        async with connect(capsd.url) as ws:
            for task_id in ids:
                await ws.send(frame(task_id, samples, False, "file", (60, 59)))
            for task_id in ids:
                await ws.send(frame(task_id, samples[:0], True, "file", (60, 59)))
            return await receive(ws, set(ids))

    frames = asyncio.run(hoard())
    for task_id in ids[3:]:
        assert frames[task_id][-1]["error"]["code"] == "overloaded"
    for task_id in ids[:3]:
        assert_exact(frames[task_id], digits, starts)
