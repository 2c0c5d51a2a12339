"""Health and metrics on the WebSocket port, for balancers and Prometheus (a real capsd)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from capsd.selftest.tones import synth
from tests.support.checks import (
    assert_exact,
    http_get,
    run_client,
    scrape,
    stop_loading_workers,
    stop_while_decoding,
    task_ids,
    wait_for,
)
from tests.support.client import connect, frame, receive, send_file
from tests.support.daemon import Capsd

pytestmark = pytest.mark.integration


def test_livez_readyz_and_404_beside_capsWriter_clients(start_capsd: Any) -> None:
    capsd = start_capsd()
    assert http_get(capsd.port, "/livez") == (200, "alive\n")
    assert http_get(capsd.port, "/readyz") == (200, "ready\n")
    status, body = http_get(capsd.port, "/anything")
    assert status == 404 and "/readyz" in body
    samples, starts = synth("1234")
    assert_exact(asyncio.run(run_client(capsd.url, [("dictation", "mic", samples, (15, 2))]))["dictation"], "1234", starts)


def test_readyz_is_503_while_the_workers_load(start_capsd: Any) -> None:
    capsd = start_capsd(wait=False)
    workers = stop_loading_workers(capsd)
    try:
        wait_for(capsd.socket.exists, 30, "the control socket")
        assert http_get(capsd.port, "/readyz") == (503, "starting: the workers are loading the model\n")
        assert http_get(capsd.port, "/livez")[0] == 200
    finally:
        for p in workers:
            p.send_signal(signal.SIGCONT)
    wait_for(lambda: http_get(capsd.port, "/readyz")[0] == 200, 60, "ready")


def test_readyz_is_503_when_no_worker_is_ready(start_capsd: Any) -> None:
    capsd = start_capsd({"workers": {"preload": False}})  # a spawned replacement, held while it loads
    old = capsd.worker_pid(0)
    os.kill(old, signal.SIGKILL)
    workers = stop_loading_workers(capsd, old=(old,))  # the replacement, stopped while it loads
    try:
        wait_for(lambda: capsd.status()["slots"][0]["state"] == "restarting", 30, "restarting")
        assert http_get(capsd.port, "/readyz") == (503, "no worker is ready\n")
    finally:
        for p in workers:
            p.send_signal(signal.SIGCONT)
    wait_for(lambda: http_get(capsd.port, "/readyz")[0] == 200, 60, "ready again")


def test_readyz_is_503_from_the_first_moment_of_a_graceful_stop(start_capsd: Any, heavy_model: Path) -> None:
    capsd = start_capsd({"model": {"dir": str(heavy_model)}})
    digits = "1234567890" * 8
    samples, starts = synth(digits)

    async def scenario() -> tuple[dict[str, Any], tuple[int, str], dict[str, Any], dict[str, Any]]:
        async with connect(capsd.url) as ws:
            await stop_while_decoding(capsd, ws, samples)
            readyz = await asyncio.to_thread(http_get, capsd.port, "/readyz")
            status = await asyncio.to_thread(capsd.status)  # still answered while the stop drains
            restart = await asyncio.to_thread(capsd.control, cmd="restart-worker", slot=0)
            return await receive(ws, {"finishing"}), readyz, status, restart

    frames, readyz, status, restart = asyncio.run(scenario())
    assert readyz == (503, "stopping\n")
    assert status["state"] == "stopping" and status["slots"][0]["tasks_in_progress"] == 1
    assert not restart["ok"] and "stopping" in restart["error"]
    assert_exact(frames["finishing"], digits, starts)  # the task in progress still finishes
    assert capsd.proc.wait(30) == 0


def test_metrics_count_what_was_done_and_agree_with_status(start_capsd: Any, heavy_model: Path) -> None:
    capsd = start_capsd({"workers": {"count": 2, "queue_limit": 2, "work_stealing": False},
                         "model": {"dir": str(heavy_model)}})  # fmt: skip
    _, on1 = task_ids(2)
    extra = task_ids(2, "extra")[1]  # homed on slot 1 too
    long_audio, _ = synth("1234567890" * 8)  # 40 s: 3 segments of 15/2
    short, _ = synth("42")

    async def mix() -> None:
        async with connect(capsd.url) as ws:
            for task_id in ("done-a", "done-b"):
                await ws.send(frame(task_id, short, True, "mic", (15, 2)))
            await ws.send(frame("bad", short, True, "mic", (0.5, 0)))  # bad_request
            await receive(ws, {"done-a", "done-b", "bad"})
            await send_file(ws, on1, long_audio, seg=(15, 2))  # slot 1 stays busy with it ...
            await asyncio.to_thread(wait_for, lambda: capsd.status()["slots"][1]["state"] == "busy", 30, "busy")
            worker = capsd.worker_pid(1)
            os.kill(worker, signal.SIGSTOP)  # its 2 other segments stay queued: the queue is full
            async with connect(capsd.url) as other:  # this connection is held back: its slot is full
                await other.send(frame(extra, short, True, "file", (15, 2)))
                await receive(other, {extra})  # overloaded
            os.kill(worker, signal.SIGKILL)  # the task it was decoding fails worker_crashed
            await receive(ws, {on1})

    asyncio.run(mix())
    wait_for(lambda: capsd.status()["slots"][1]["state"] == "ready", 60, "slot 1 back")
    metrics, status = scrape(capsd), capsd.status()

    def tasks(outcome: str) -> float:
        return sum(v for (name, labels), v in metrics.items() if name == "capsd_tasks_total" and ("outcome", outcome) in labels)

    assert [tasks(o) for o in ("done", "bad_request", "worker_crashed", "overloaded")] == [2, 1, 1, 1]
    assert tasks("done") == sum(s["tasks_done"] for s in status["slots"])
    assert sum(tasks(o) for o in ("bad_request", "worker_crashed", "overloaded")) == sum(s["tasks_failed"] for s in status["slots"])
    assert metrics[("capsd_worker_restarts_total", (("reason", "crashed"), ("slot", "1")))] == 1
    assert metrics[("capsd_result_latency_seconds_count", (("source", "mic"),))] == 2
    assert metrics[("capsd_decode_seconds_count", ())] >= 2
    assert metrics[("capsd_audio_seconds_total", ())] > 0
    for s in status["slots"]:
        labels = (("slot", str(s["slot"])),)
        assert metrics[("capsd_queue_depth", labels)] == s["queue_depth"]
        assert metrics[("capsd_slot_state", (("slot", str(s["slot"])), ("state", s["state"])))] == 1
    assert metrics[("capsd_memory_planned_bytes", ())] == status["memory"]["planned_bytes"]
    assert metrics[("capsd_build_info", (("version", status["version"]),))] == 1


def test_with_metrics_off_metrics_answers_404_and_readyz_still_answers(start_capsd: Any) -> None:
    capsd = start_capsd({"server": {"metrics": False}})
    assert http_get(capsd.port, "/metrics")[0] == 404
    assert http_get(capsd.port, "/readyz")[0] == 200


def ctrl_c_heard() -> None:
    """In capsctl's process: SIGINT as a terminal sends it. A suite started in the background by
    a non-interactive shell ignores SIGINT, and its children would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_capsctl_status_shows_cpu_and_audio_rates_and_watches_until_ctrl_c(start_capsd: Any) -> None:
    capsd = start_capsd()
    digits = "1234567890" * 6
    samples, starts = synth(digits)
    assert_exact(asyncio.run(run_client(capsd.url, [("file", "file", samples, (15, 2))]))["file"], digits, starts)
    wait_for(lambda: capsd.status()["slots"][0]["cpu_share"] > 0, 30, "a CPU share")
    assert 0 < capsd.status()["audio_per_second"]
    watch = subprocess.Popen([sys.executable, "-m", "capsd.ctl", "--socket", str(capsd.socket), "status", "--watch", "0.2"],
                             stdout=subprocess.PIPE, text=True, preexec_fn=ctrl_c_heard)  # fmt: skip
    lines = []
    assert watch.stdout is not None
    while sum("SLOT" in line for line in lines) < 3:  # three tables drawn
        lines.append(watch.stdout.readline())
    watch.send_signal(signal.SIGINT)
    assert watch.wait(30) == 0
    assert "\033[H\033[2J" in "".join(lines) and any("audio recognised" in line for line in lines)


def test_capsctl_status_watch_outlives_a_restart_of_capsd(start_capsd: Any) -> None:
    """While capsd is gone, --watch says so on one line with the time and keeps polling; the
    table is back with the new capsd (on the same control socket); Ctrl-C still exits 0."""
    capsd = start_capsd()
    watch = subprocess.Popen([sys.executable, "-m", "capsd.ctl", "--socket", str(capsd.socket), "status", "--watch", "0.2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_heard)  # fmt: skip
    assert watch.stdout is not None

    def until(seen: Callable[[str], bool]) -> str:
        while not seen(line := watch.stdout.readline()):
            assert line, f"capsctl ended: {watch.wait()} {watch.stderr.read()}"
        return line

    second = None
    try:
        until(lambda line: "SLOT" in line)
        assert capsd.stop() == 0
        gone = until(lambda line: "not running" in line)
        assert re.search(r"\d\d:\d\d:\d\d capsd is not running", gone), gone
        until(lambda line: "not running" in line)  # still polling
        second = Capsd(capsd.config_path.parent, {})  # the same config dir, so the same socket
        until(lambda line: f"pid {second.proc.pid} " in line)  # the new capsd's table
        until(lambda line: "SLOT" in line)
        watch.send_signal(signal.SIGINT)
        assert watch.wait(30) == 0
    finally:
        if watch.poll() is None:
            watch.kill()
        if second is not None:
            second.stop()
