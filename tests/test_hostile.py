"""Hostile clients against a real capsd: valid frames with hostile values, clients that walk away
or stop reading, descriptors running out, stops with unresponsive clients.

Each test runs a well-behaved dictation on the abused slot alongside and checks that it stays
exact and is answered promptly, and, where a client floods, that the supervisor's peak memory
stays within what the memory plan reserves for it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from capsd.protocol import route
from capsd.selftest.tones import synth
from tests.support.checks import GOOD_DIGITS, assert_exact, dictate, task_outcomes, wait_for
from tests.support.client import connect, file_frames, frame, receive, send_file, send_mic
from tests.support.daemon import Capsd

pytestmark = pytest.mark.integration


def same_slot(task_id: str, count: int, prefix: str = "good") -> str:
    return next(f"{prefix}-{n}" for n in range(10_000) if route(f"{prefix}-{n}", count) == route(task_id, count))


def slot_status(capsd: Capsd, task_id: str) -> dict[str, Any]:
    slots = capsd.status()["slots"]
    return slots[route(task_id, len(slots))]


def test_a_stride_of_nothing_is_refused_and_the_loop_keeps_serving(start_capsd: Any) -> None:
    capsd = start_capsd({"workers": {"count": 2}})
    hostile = "stride"
    minute, _ = synth("1234567890" * 12)

    async def scenario() -> list[dict[str, Any]]:
        async with connect(capsd.url) as ws:
            await ws.send(frame(hostile, minute[:0], True, "mic", (1e-05, 0)))  # one 108-byte frame
            await ws.send(frame(hostile, minute, True, "file", (0.001, 0)))  # 60,000 segments
            answers = [json.loads(await asyncio.wait_for(ws.recv(), 30)) for _ in range(2)]
            await dictate(capsd.url, same_slot(hostile, 2))
            return answers

    for answer in asyncio.run(scenario()):
        assert answer["task_id"] == hostile and answer["error"]["code"] == "bad_request"
        assert "seg_duration" in answer["error"]["message"]
    assert capsd.stop() == 0  # SIGTERM is heard


def test_the_smallest_stride_cannot_flood_a_slot(start_capsd: Any) -> None:
    """1 s segments from 60 s frames: 60 segments a frame, never final. The connection is not
    read while more than front.MAX_WAITING_SEGMENTS (32) of its segments wait, so it cannot fill
    its slot's queue (256) and refuse others; the slot's dictation goes first."""
    capsd = start_capsd({"workers": {"count": 2}})
    hostile = "flood"
    minute, _ = synth("1234567890" * 12)
    depths = []

    async def flood(ws: Any) -> None:
        for _ in range(200):  # 12,000 segments: more than the test lasts
            await ws.send(frame(hostile, minute, False, "file", (1, 0)))

    async def scenario() -> None:
        async with connect(capsd.url) as ws:
            flooding = asyncio.create_task(flood(ws))
            for _ in range(3):
                await asyncio.sleep(2)
                depths.append(slot_status(capsd, hostile)["queue_depth"])
                await dictate(capsd.url, same_slot(hostile, 2))
            assert not flooding.done()  # flow control holds the client back
            flooding.cancel()

    asyncio.run(scenario())
    assert max(depths) <= 32 + 60, depths  # the bound, plus at most one frame's segments
    wait_for(lambda: slot_status(capsd, hostile)["queue_depth"] == 0, 30, "the closed connection's segments dropped")
    assert capsd.peak_rss() <= capsd.plan().supervisor_bytes, capsd.peak_rss() >> 20


def test_closing_the_connection_cancels_tasks_past_their_final_frame(start_capsd: Any, heavy_model: Path) -> None:
    """A user closes CapsWriter's file window after the whole file was sent: nothing of it is
    decoded any more (4 min of audio would keep the worker busy for ~10 s)."""
    capsd = start_capsd({"model": {"dir": str(heavy_model)}})
    samples, _ = synth("1234567890" * 48)  # 240 s

    async def walk_away() -> None:
        async with connect(capsd.url) as ws:
            await send_file(ws, "walked-away", samples)  # is_final on the last frame
            await asyncio.to_thread(wait_for, lambda: capsd.status()["slots"][0]["queue_depth"] > 2, 30, "queued")

    asyncio.run(walk_away())
    wait_for(lambda: capsd.status()["slots"][0]["tasks_in_progress"] == 0, 30, "the task cancelled")
    slot = capsd.status()["slots"][0]
    assert slot["queue_depth"] == 0 and slot["tasks_done"] == 0 and slot["tasks_failed"] == 0
    asyncio.run(dictate(capsd.url, "after"))


def test_a_task_that_never_ends_is_held_back_not_queued(start_capsd: Any, heavy_model: Path) -> None:
    """60 s frames, never is_final, with both workers stopped so that nothing drains: the
    connection is not read once more than front.MAX_WAITING_AUDIO_BYTES of its audio waits, so
    the client stalls; then the workers go on and the slot's dictation is served."""
    capsd = start_capsd({"workers": {"count": 2}, "model": {"dir": str(heavy_model)}})
    hostile = "endless"
    minute, _ = synth("1234567890" * 12)
    sent = [0]
    workers = [capsd.worker_pid(i) for i in range(2)]

    async def stream(ws: Any) -> None:
        for _ in range(40):
            await ws.send(frame(hostile, minute, False, "file", (25, 2)))
            sent[0] += 1

    def stalled() -> bool:
        before = sent[0]
        time.sleep(2)
        return sent[0] == before > 0

    async def scenario() -> int:
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        try:
            async with connect(capsd.url) as ws:
                streaming = asyncio.create_task(stream(ws))
                await asyncio.to_thread(wait_for, stalled, 20, "the client held back")
                depth = slot_status(capsd, hostile)["queue_depth"]
                for pid in workers:
                    os.kill(pid, signal.SIGCONT)
                await dictate(capsd.url, same_slot(hostile, 2))
                streaming.cancel()
                return depth
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)

    depth = asyncio.run(scenario())
    # 16 MiB is ~4.4 min of audio: ~10 segments of 27 s, plus the frame being cut.
    assert depth <= 16, depth
    assert sent[0] < 20, sent  # the rest waits in the client: TCP backpressure
    assert capsd.peak_rss() <= capsd.plan().supervisor_bytes, capsd.peak_rss() >> 20


def test_an_rss_recycle_waits_only_for_the_job_in_progress(start_capsd: Any) -> None:
    """Workers keep nothing between segments: a task that stays open does not hold a recycle
    back, and goes on exactly on the new worker."""
    capsd = start_capsd({"workers": {"max_rss_mb": 10}})
    # 180 s: one 119.9 s segment grows what the (forked) worker holds alone from ~1 to ~18 MB
    digits = "1234567890" * 36
    samples, starts = synth(digits)
    old = capsd.worker_pid(0)

    async def scenario() -> dict[str, Any]:
        async with connect(capsd.url) as ws:
            chunks = file_frames("open", samples, seg=(60, 59.9))
            for chunk in chunks[:-1]:  # not final yet
                await ws.send(chunk)
            await asyncio.to_thread(wait_for, lambda: capsd.status()["slots"][0]["last_exit"], 60, "the recycle")
            await dictate(capsd.url, "after-recycle")
            await ws.send(chunks[-1])
            return await receive(ws, {"open"}, timeout=60)

    frames = asyncio.run(scenario())
    assert_exact(frames["open"], digits, starts)
    slot = capsd.status()["slots"][0]
    assert slot["last_exit"]["reason"] == "rss" and slot["pid"] != old and slot["tasks_failed"] == 0


def test_a_drain_that_cannot_finish_is_forced_at_its_deadline(start_capsd: Any, heavy_model: Path) -> None:
    """restart-worker --timeout 2 while the worker is stopped mid-job: forced after 2 s; the task
    whose job it was fails with worker_restarted."""
    capsd = start_capsd({"model": {"dir": str(heavy_model)}})
    samples, _ = synth("1234567890" * 8)
    old = capsd.worker_pid(0)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        async with connect(capsd.url) as ws:
            await send_file(ws, "stuck", samples, seg=(15, 2))
            await asyncio.to_thread(wait_for, lambda: capsd.status()["slots"][0]["state"] == "busy", 30, "busy")
            os.kill(old, signal.SIGSTOP)
            reply = await asyncio.to_thread(capsd.control, cmd="restart-worker", slot=0, force=False, timeout=2)
            return await receive(ws, {"stuck"}), reply

    frames, reply = asyncio.run(scenario())
    assert reply["ok"] and reply["old_pid"] == old and reply["new_pid"] != old
    assert frames["stuck"][-1]["error"]["code"] == "worker_restarted"
    assert "drain timed out" in capsd.logs()
    asyncio.run(dictate(capsd.url, "after"))


def test_thousands_of_task_ids_on_one_connection_are_refused_beyond_the_bound(start_capsd: Any) -> None:
    """front.MAX_OPEN_TASKS (32) tasks may wait for their is_final on one connection; each
    further one is refused with overloaded, its later frames dropped, its error frame sent at
    its is_final."""
    capsd = start_capsd({"workers": {"count": 2}})
    blip = synth("1")[0][:1600]
    ids = [f"many-{i}" for i in range(1000)]

    async def scenario() -> dict[str, list[dict[str, Any]]]:
        async with connect(capsd.url) as ws:
            for _ in range(2):
                for task_id in ids:
                    await ws.send(frame(task_id, blip, False, "mic", (15, 2)))
            await dictate(capsd.url, same_slot(ids[0], 2))
            for task_id in ids:
                await ws.send(frame(task_id, blip[:0], True, "mic", (15, 2)))
            frames = await receive(ws, set(ids))
            await send_mic(ws, "then-more", synth(GOOD_DIGITS)[0])  # room again on this connection
            return frames | await receive(ws, {"then-more"})

    frames = asyncio.run(scenario())
    assert all(len(frames[t]) == 1 and frames[t][0]["error"]["code"] == "overloaded" for t in ids[32:])
    assert all("error" not in frames[t][-1] for t in ids[:32])
    assert frames["then-more"][-1]["text"] == GOOD_DIGITS


def test_long_task_ids_are_refused_and_neither_kept_nor_logged_whole(start_capsd: Any) -> None:
    """Ids over 256 characters get bad_request with task_id null and are not kept; of refused
    ids, front.MAX_REFUSED_IDS (1024) are kept, the oldest answered at once beyond it."""
    capsd = start_capsd({"workers": {"count": 2}})
    log_before = len(capsd.logs())
    blip = synth("1")[0][:1600]
    kept = [f"{i:08d}" * 32 for i in range(3000)]  # 256 characters each

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        async with connect(capsd.url) as ws:
            for i in range(200):
                await ws.send(frame(f"{i:04d}" * 1024, blip, False, "mic", (15, 2)))  # 4 KB ids
            for i in range(2):
                await ws.send(frame(f"{i}" * 10_000_000, blip, False, "mic", (15, 2)))  # 10 MB ids
            for task_id in kept:  # bad frames, not final: their answers wait for their is_final
                await ws.send(frame(task_id, blip, False, "radio", (15, 2)))
            at_once = [json.loads(await asyncio.wait_for(ws.recv(), 60)) for _ in range(202 + 3000 - 1024)]
            await dictate(capsd.url, "good-0")
            for task_id in kept[-1024:]:
                await ws.send(frame(task_id, blip[:0], True, "mic", (15, 2)))
            at_final = [json.loads(await asyncio.wait_for(ws.recv(), 60)) for _ in range(1024)]
            return at_once, at_final

    at_once, at_final = asyncio.run(scenario())
    assert all(a["error"]["code"] == "bad_request" for a in at_once + at_final)
    assert all(a["task_id"] is None for a in at_once[:202])
    assert "characters long: at most 256" in at_once[0]["error"]["message"]
    assert [a["task_id"] for a in at_once[202:]] == kept[:-1024]  # forgotten oldest first
    assert [a["task_id"] for a in at_final] == kept[-1024:]
    assert len(capsd.logs()) - log_before < 64 * 1024  # not the 10 MB ids, nor a line per frame
    assert capsd.peak_rss() <= capsd.plan().supervisor_bytes, capsd.peak_rss() >> 20


def test_a_client_that_never_reads_is_closed_and_its_tasks_counted_failed(start_capsd: Any) -> None:
    """Unread results are bounded by front.MAX_OUTBOX_BYTES (8 MiB); then the client is closed
    with 1008, logged once with why, and its open tasks are cancelled, queued segments dropped,
    each counted failed (connection_closed) alike in status and metrics. Partial frames are rate
    limited (docs/design.md#long-tasks), so the results that pile up here are error frames: one
    for each bad final frame, answered at once."""
    capsd = start_capsd({"workers": {"count": 2}})
    hostile = "unread-0"
    samples, _ = synth("1234567890" * 6)  # 30 s, never final: two tasks stay open
    bad = [json.dumps({"task_id": f"{n:0>256}", "source": "mic", "is_final": True, "time_start": 0, "data": "!"})
           for n in range(60_000)]  # fmt: skip

    async def flood() -> None:
        async with connect(capsd.url, max_queue=1) as ws:
            ws.transport.pause_reading()  # reads nothing, answers nothing
            try:
                for task_id in (hostile, "unread-1"):
                    await ws.send(frame(task_id, samples, False, "file", (1, 0)))
                for message in bad:  # each answered with a ~500-byte error frame, never read
                    await ws.send(message)
            except ConnectionClosed:
                pass

    async def scenario() -> None:
        flooding = asyncio.create_task(flood())
        await asyncio.to_thread(wait_for, lambda: "client not reading" in capsd.logs(), 120, "the 1008 close")
        await dictate(capsd.url, same_slot(hostile, 2))
        await flooding

    asyncio.run(scenario())
    wait_for(lambda: all(s["tasks_in_progress"] == s["queue_depth"] == 0 for s in capsd.status()["slots"]), 30)
    assert capsd.peak_rss() <= capsd.plan().supervisor_bytes, capsd.peak_rss() >> 20
    [line] = closes(capsd)
    assert "code=1008" in line and "unread_bytes=" in line and "peer=" in line
    closed = int(re.search(r"tasks=(\d+)", line)[1])
    assert closed == 2
    outcomes = task_outcomes(capsd)
    assert outcomes.keys() <= {"done", "connection_closed", "bad_request"}
    assert outcomes["connection_closed"] == closed
    assert sum(s["tasks_failed"] for s in capsd.status()["slots"]) == closed + outcomes["bad_request"]


def closes(capsd: Capsd) -> list[str]:
    return [line for line in capsd.logs().splitlines() if "connection closed by capsd" in line]


async def answered(ws: Any) -> None:
    """A ping from the client, answered: capsd has read everything the client sent before it."""
    await (await ws.ping())


def test_file_clients_held_back_over_a_minute_are_not_closed_by_keepalive(start_capsd: Any) -> None:
    """12 CapsWriter file clients send 6 min files at once to one slot, whose worker is stopped for
    70 s: flow control holds each back (the intake, once all of them together hold its budget, and
    each connection's own bounds), so capsd's pings are answered behind frames it does not read,
    for longer than the default keepalive allows (a ping every 20 s, 20 s for its pong). None is closed, every task is exact: capsd's keepalive
    runs only while it reads a connection (docs/design.md#keepalive-only-while-read). A client
    that stops answering while capsd reads it is still found dead, closed with 1011 and its task
    counted failed."""
    capsd = start_capsd({"workers": {"heartbeat_timeout_s": 300}})  # the worker is stopped, not hung
    digits = "1234567890" * 72  # 6 min: 6 frames of 60 s
    samples, starts = synth(digits)
    ids = [f"held-{i}" for i in range(12)]
    held: list[Any] = []

    async def file_client(task_id: str) -> list[dict[str, Any]]:
        async with connect(capsd.url) as ws:  # no keepalive of its own; it answers capsd's pings
            held.append(ws)
            await send_file(ws, task_id, samples)
            return (await receive(ws, {task_id}, timeout=600))[task_id]

    def all_held_back() -> bool:
        """Nothing more of any connection read for 3 s, with the intake at its budget: every
        client is held back, each by the intake or its own bounds."""
        before = capsd.status()
        time.sleep(3)
        after = capsd.status()
        waiting = after["intake"]["connections_waiting"]
        return after["slots"][0]["queue_depth"] == before["slots"][0]["queue_depth"] > 0 and waiting > 0

    async def scenario() -> list[list[dict[str, Any]]]:
        worker = capsd.worker_pid(0)
        os.kill(worker, signal.SIGSTOP)
        try:
            async with connect(capsd.url) as silent:
                await silent.send(frame("silent", synth("1")[0][:1600], False, "mic", (15, 2)))
                silent.transport.pause_reading()  # from now on it answers no ping: gone, for capsd
                clients = [asyncio.create_task(file_client(task_id)) for task_id in ids]
                await asyncio.to_thread(wait_for, all_held_back, 120, "every file client held back")
                probes = [asyncio.create_task(answered(ws)) for ws in held]
                await asyncio.sleep(70)
                assert not any(probe.done() for probe in probes)  # capsd read none of them meanwhile
                assert all(ws.state is State.OPEN for ws in held)
                await asyncio.to_thread(wait_for, lambda: "keepalive ping timeout" in capsd.logs(), 30, "1011")
                os.kill(worker, signal.SIGCONT)
                await dictate(capsd.url, "dictation")
                files = await asyncio.gather(*clients)
                await asyncio.wait_for(asyncio.gather(*probes), 30)
                silent.transport.resume_reading()
                return files
        finally:
            os.kill(worker, signal.SIGCONT)

    files = asyncio.run(scenario())
    assert len(files) == len(ids)
    for frames in files:
        assert_exact(frames, digits, starts)
    [line] = closes(capsd)
    assert "code=1011" in line and "keepalive ping timeout" in line and "tasks=1" in line and "peer=" in line
    slot = capsd.status()["slots"][0]
    assert (slot["tasks_done"], slot["tasks_failed"]) == (len(ids) + 1, 1)
    assert task_outcomes(capsd) == {"done": len(ids) + 1, "connection_closed": 1}


def test_task_ids_that_cannot_be_encoded_are_bad_requests_and_harm_nothing(start_capsd: Any) -> None:
    """300 frames whose task id is a lone surrogate (JSON "\\ud800": valid JSON, no valid
    Unicode) between the frames of a good task: each answered bad_request with task_id null, the
    good task exact, a dictation alongside too, and the log a few rate-limited lines."""
    capsd = start_capsd()
    samples, starts = synth("31415926")
    step = len(samples) // 30
    unencodable = ["\ud800", "a\udfff", "\ud83d\ud83d"]

    async def scenario() -> dict[str, list[dict[str, Any]]]:
        async with connect(capsd.url) as ws:
            for i in range(300):
                await ws.send(frame(unencodable[i % 3], samples[:160], i % 2 == 0, "mic", (15, 2)))
                if i % 10 == 0:
                    await ws.send(frame("good", samples[i // 10 * step : (i // 10 + 1) * step], False, "mic", (15, 2)))
            await ws.send(frame("good", samples[30 * step :], True, "mic", (15, 2)))
            await dictate(capsd.url, "dictation")
            return await receive(ws, {"good"})

    frames = asyncio.run(scenario())
    assert_exact(frames["good"], "31415926", starts)
    assert len(frames[None]) == 300
    assert all(f["error"]["code"] == "bad_request" and "not valid Unicode" in f["error"]["message"] for f in frames[None])
    logs = capsd.logs()
    assert "Traceback" not in logs and "connection closed" not in logs
    assert 1 <= logs.count("bad frame") <= 10, logs.count("bad frame")


def test_a_sigterm_just_after_a_whole_file_still_answers_it(start_capsd: Any) -> None:
    """The frames are still being parsed when the stop begins: the task is answered (its result
    or shutting_down) before the connection closes, three times out of three."""
    samples, starts = synth("1234567890" * 12 + "1")  # 60.5 s: two frames

    async def scenario(capsd: Capsd, task_id: str) -> tuple[list[dict[str, Any]], int | None]:
        frames = []
        async with connect(capsd.url) as ws:
            await send_file(ws, task_id, samples)
            capsd.proc.send_signal(signal.SIGTERM)
            try:
                while True:
                    frames.append(json.loads(await ws.recv()))
            except ConnectionClosed as e:
                return frames, e.rcvd.code if e.rcvd else None

    for run in range(3):
        capsd = start_capsd()
        frames, code = asyncio.run(scenario(capsd, f"last-{run}"))
        assert [f["is_final"] for f in frames].count(True) == 1, frames
        final = frames[-1]
        if "error" in final:
            assert final["error"]["code"] == "shutting_down"
        else:
            assert_exact(frames, "1234567890" * 12 + "1", starts)
        assert code == 1001
        assert capsd.proc.wait(30) == 0


def test_a_frame_half_received_when_the_stop_begins_is_answered_before_the_close(start_capsd: Any) -> None:
    """SIGTERM while a client is in the middle of a frame: capsd waits for the rest (at most
    front.FLUSH_TIMEOUT_S), answers it, then closes with 1001. This client, websockets' sans-I/O
    protocol on a plain socket, answers capsd's ping only once its frame is sent, as every client
    does: a control frame never splits a frame (docs/design.md#stopping)."""
    capsd = start_capsd()
    protocol = ClientProtocol(parse_uri(capsd.url))
    events: list[Any] = []

    def exchange(sock: socket.socket) -> bool:
        """Send what the protocol has to send, then read what comes; False at the end of the stream."""
        sock.sendall(b"".join(protocol.data_to_send()))
        data = sock.recv(2**16)
        protocol.receive_data(data) if data else protocol.receive_eof()
        events.extend(protocol.events_received())
        return bool(data)

    with socket.create_connection(("127.0.0.1", capsd.port), timeout=30) as sock:
        protocol.send_request(protocol.connect())
        while not events:
            exchange(sock)  # the handshake's response
        protocol.send_text(frame("last-words", synth("7")[0], True, "mic", (15, 2)).encode())
        message = b"".join(protocol.data_to_send())
        sock.sendall(message[: len(message) // 2])
        capsd.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "stopping" in capsd.logs(), 30, "the stop")
        time.sleep(0.2)
        sock.sendall(message[len(message) // 2 :])
        while exchange(sock):
            pass
    answers = [json.loads(e.data) for e in events if getattr(e, "opcode", None) is Opcode.TEXT]
    assert [a["task_id"] for a in answers] == ["last-words"]
    assert answers[0]["is_final"] and answers[0]["error"]["code"] == "shutting_down"
    assert protocol.close_code == 1001
    assert capsd.proc.wait(30) == 0


def test_sigterm_with_clients_that_stopped_responding_stops_on_time(start_capsd: Any) -> None:
    """Connections close at once, each unresponsive one cut off after front.CLOSE_TIMEOUT_S."""
    capsd = start_capsd({"server": {"stop_timeout_s": 2}})
    blip = synth("1")[0][:1600]

    async def scenario() -> float:
        clients = [await connect(capsd.url) for _ in range(8)]
        for i, ws in enumerate(clients):
            await ws.send(frame(f"open-{i}", blip, False, "mic", (15, 2)))  # a task in progress
            ws.transport.pause_reading()  # then nothing: no reads, no close handshake
        await asyncio.to_thread(wait_for, lambda: capsd.status()["slots"][0]["tasks_in_progress"] == 8, 30)
        stopping = time.monotonic()
        capsd.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(capsd.proc.wait, 60)
        return time.monotonic() - stopping

    took = asyncio.run(scenario())
    assert capsd.proc.returncode == 0
    # 2 s for the tasks + 2 s to flush + 3 s to close, concurrently; one after another was 8 x 5 s.
    assert took < 2 + 2 + 3 + 8, took
    assert "capsd stopped" in capsd.logs()


def test_running_out_of_descriptors_delays_a_replacement_but_loses_nothing(start_capsd: Any) -> None:
    """Silent TCP connects use up capsd's descriptors; a worker dies meanwhile. Its replacement
    is retried with backoff until descriptors are free again; accept errors are logged at most
    once a second."""

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (160, 160))

    capsd = start_capsd({"workers": {"restart_intensity": 50}}, preexec_fn=low_limit)
    silent = []
    started, worker = time.monotonic(), capsd.worker_pid(0)
    try:
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", capsd.port))
            silent.append(sock)
        wait_for(lambda: "event loop error" in capsd.logs(), 30, "accept to fail")
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: "cannot start worker" in capsd.logs(), 30, "the replacement to fail")
    finally:
        for sock in silent:
            sock.close()
    wait_for(lambda: capsd.status()["slots"][0]["state"] == "ready", 60, "the replacement")
    asyncio.run(dictate(capsd.url, "after"))
    seconds = time.monotonic() - started
    assert capsd.logs().count("event loop error") <= seconds + 1
    slot = capsd.status()["slots"][0]
    assert slot["last_exit"]["reason"] == "crashed" and slot["restarts"] >= 1
