"""Never lose an accepted task: workers killed at awkward moments (mid-send, during a stop, twice
by the same job), slow jobs that are not hung, stopped workers that are, and the opt-in retry of
a lost job (docs/design.md#deadlines, docs/design.md#retrying-a-lost-job). Real processes, real
signals, each with a good dictation alongside."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from capsd.selftest.tones import synth
from tests.support.checks import assert_exact, http_get, run_client, wait_for
from tests.support.client import connect, receive, send_file, send_mic

pytestmark = pytest.mark.integration

DICTATIONS = {f"dictation-{i}": digits for i, digits in enumerate(("11", "202", "3003", "4004"))}


def busy_pid(capsd: Any, slot: int = 0, other_than: int = 0) -> int:
    """The pid of the slot's worker once it is decoding, a new one if `other_than` is given."""

    def busy() -> int | None:
        s = capsd.status()["slots"][slot]
        return s["pid"] if s["state"] == "busy" and s["pid"] != other_than else None

    return wait_for(busy, 60, f"slot {slot} busy")


def all_busy(capsd: Any) -> list[int] | None:
    slots = capsd.status()["slots"]
    return [s["pid"] for s in slots] if all(s["state"] == "busy" for s in slots) else None


def accepted(capsd: Any) -> int:
    """Tasks accepted so far: in progress or done."""
    return sum(s["tasks_in_progress"] + s["tasks_done"] for s in capsd.status()["slots"])


async def dictate_all(ws: Any) -> dict[str, list[dict[str, Any]]]:
    for task_id, digits in DICTATIONS.items():
        await send_mic(ws, task_id, synth(digits)[0])
    return await receive(ws, set(DICTATIONS))


def assert_dictations_exact(frames: dict[str, list[dict[str, Any]]]) -> None:
    for task_id, digits in DICTATIONS.items():
        assert_exact(frames[task_id], digits, synth(digits)[1])


def final(frames: list[dict[str, Any]]) -> dict[str, Any]:
    assert [f["is_final"] for f in frames].count(True) == 1
    return frames[-1]


@pytest.mark.parametrize("retry", [0, 1])
def test_a_worker_killed_mid_send_loses_at_most_the_job_being_sent(start_capsd: Any, retry: int) -> None:
    """The worker is stopped, so a 62 s segment (4 MB, far more than a pipe holds) is stuck in
    its send; four dictations wait behind it. Then the worker is SIGKILLed."""
    capsd = start_capsd({"workers": {"retry_lost_jobs": retry}})
    pid = capsd.worker_pid(0)
    os.kill(pid, signal.SIGSTOP)
    digits = "1234567890" * 14  # 70 s: a 62 s segment, then the rest
    audio, starts = synth(digits)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        async with connect(capsd.url) as ws_file, connect(capsd.url) as ws_mic:
            await send_file(ws_file, "big", audio, seg=(60, 2))
            await asyncio.to_thread(busy_pid, capsd)
            dictations = asyncio.create_task(dictate_all(ws_mic))
            await asyncio.to_thread(wait_for, lambda: capsd.status()["slots"][0]["queue_depth"] >= 5, 30, "queued")
            os.kill(pid, signal.SIGKILL)
            return await receive(ws_file, {"big"}), await dictations

    big, dictations = asyncio.run(scenario())
    assert_dictations_exact(dictations)
    if retry:
        assert_exact(big["big"], digits, starts)
    else:
        assert final(big["big"])["error"]["code"] == "worker_crashed"
    slot = wait_for(lambda: (s := capsd.status()["slots"][0])["tasks_in_progress"] == 0 and s, 30, "no task left")
    assert slot["restarts"] == 1 and slot["tasks_failed"] == 1 - retry and slot["tasks_done"] == 4 + retry


@pytest.mark.parametrize("retry", [0, 1])
def test_a_worker_killed_during_a_stop_leaves_every_task_answered(
    start_capsd: Any, heavy_model: Path, retry: int
) -> None:
    """SIGTERM with a file decoding and a dictation waiting, then the busy worker is SIGKILLed
    in the grace period: a replacement finishes what waits (and, with retry, the lost job)."""
    capsd = start_capsd({"model": {"dir": str(heavy_model)}, "workers": {"retry_lost_jobs": retry}})
    digits = "1234567890" * 18  # 90 s: four segments of 25 + 2 s
    audio, starts = synth(digits)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], float]:
        async with connect(capsd.url) as ws_file, connect(capsd.url) as ws_mic:
            await send_file(ws_file, "file", audio, seg=(25, 2))
            pid = await asyncio.to_thread(busy_pid, capsd)
            dictations = asyncio.create_task(dictate_all(ws_mic))
            await asyncio.to_thread(wait_for, lambda: accepted(capsd) == 1 + len(DICTATIONS), 30, "all accepted")
            capsd.proc.send_signal(signal.SIGTERM)  # tasks accepted may finish; new ones would be refused
            stopping = time.monotonic()
            await asyncio.to_thread(wait_for, lambda: "stopping" in capsd.logs(), 30, "stopping")
            os.kill(pid, signal.SIGKILL)
            frames = await receive(ws_file, {"file"}), await dictations
        await asyncio.to_thread(capsd.proc.wait, 60)
        return *frames, time.monotonic() - stopping

    file, dictations, took = asyncio.run(scenario())
    assert_dictations_exact(dictations)
    if retry:
        assert_exact(file["file"], digits, starts)
    else:
        assert final(file["file"])["error"]["code"] == "worker_crashed"
    assert capsd.proc.returncode == 0 and took < 20 + 10, took  # stop_timeout_s 20, then ~5 s to close
    logs = capsd.logs()
    assert "dispatcher failed" not in logs and "critical" not in logs and "Traceback" not in logs


def test_a_job_slower_than_heartbeat_timeout_completes_and_is_not_hung(start_capsd: Any, heavy_model: Path) -> None:
    """Each 62 s segment takes ~3 s on the heavy model; heartbeat_timeout_s is 1 s. The worker
    beats while it decodes, and the job's deadline grows with its audio."""
    capsd = start_capsd({"model": {"dir": str(heavy_model)}, "workers": {"heartbeat_timeout_s": 1}})
    digits = "1234567890" * 24  # 120 s: two segments of 60 + 2 s
    audio, starts = synth(digits)
    dictation, dictation_starts = synth("99")
    frames = asyncio.run(run_client(capsd.url, [("slow", "file", audio, (60, 2)), ("after", "mic", dictation, (15, 2))]))
    assert_exact(frames["slow"], digits, starts)
    assert_exact(frames["after"], "99", dictation_starts)
    slot = capsd.status()["slots"][0]
    assert slot["restarts"] == 0 and "worker hung" not in capsd.logs()
    assert 0 < slot["rtf"] < 0.5  # seconds per audio second, measured


def test_a_stopped_worker_is_hung_by_its_silence_and_shows_where_it_was(start_capsd: Any, heavy_model: Path) -> None:
    """A 62 s job's deadline is far beyond heartbeat_timeout_s; the stopped worker's silence
    gives it away first. SIGABRT makes its faulthandler write its stack before it dies."""
    capsd = start_capsd({"model": {"dir": str(heavy_model)}, "workers": {"heartbeat_timeout_s": 3}})
    audio, _ = synth("1234567890" * 14)

    async def scenario() -> tuple[dict[str, Any], float]:
        async with connect(capsd.url) as ws:
            await send_file(ws, "stuck", audio, seg=(60, 2))
            pid = await asyncio.to_thread(busy_pid, capsd)
            cpu = psutil.Process(pid).cpu_times().user  # decoding, not still receiving the job:
            await asyncio.to_thread(wait_for, lambda: psutil.Process(pid).cpu_times().user > cpu + 0.3, 30, "decoding")
            os.kill(pid, signal.SIGSTOP)
            stopped = time.monotonic()
            frames = await receive(ws, {"stuck"}, timeout=60)
            return frames, time.monotonic() - stopped

    frames, delay = asyncio.run(scenario())
    assert final(frames["stuck"])["error"]["code"] == "worker_hung"
    assert 2.5 <= delay < 30, delay
    logs = capsd.logs()
    assert "no heartbeat for" in logs
    assert "Fatal Python error: Aborted" in logs and "in decode" in logs  # the worker's stack, from faulthandler
    slot = wait_for(lambda: (s := capsd.status()["slots"][0])["state"] == "ready" and s, 30, "the replacement")
    assert slot["last_exit"]["reason"] == "hung"
    samples, starts = synth("4242")
    assert_exact(asyncio.run(run_client(capsd.url, [("next", "mic", samples, (15, 2))]))["next"], "4242", starts)


def test_with_retry_busy_workers_killed_mid_file_leave_the_file_exact(start_capsd: Any, heavy_model: Path) -> None:
    capsd = start_capsd({"model": {"dir": str(heavy_model)}, "workers": {"count": 2, "retry_lost_jobs": 1}})
    digits = "1234567890" * 36  # 180 s: eight segments, decoded on both slots
    audio, starts = synth(digits)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        async with connect(capsd.url) as ws_file, connect(capsd.url) as ws_mic:
            await send_file(ws_file, "file", audio, seg=(25, 2))
            both = await asyncio.to_thread(wait_for, lambda: all_busy(capsd), 60, "both slots busy")
            for pid in both:  # two distinct jobs lost, each to run again on the other slot
                os.kill(pid, signal.SIGKILL)
            dictations = await dictate_all(ws_mic)
            return await receive(ws_file, {"file"}), dictations

    file, dictations = asyncio.run(scenario())
    assert_exact(file["file"], digits, starts)
    assert_dictations_exact(dictations)
    status = capsd.status()
    assert status["retries"] == {"retried": 2, "poison_jobs": 0, "paused": False}
    assert sum(s["restarts"] for s in status["slots"]) == 2 and sum(s["tasks_failed"] for s in status["slots"]) == 0
    assert "capsd_jobs_retried_total 2.0" in http_get(capsd.port, "/metrics")[1]


def test_with_retry_a_job_that_kills_two_workers_fails_its_task_once(start_capsd: Any, heavy_model: Path) -> None:
    capsd = start_capsd({"model": {"dir": str(heavy_model)}, "workers": {"retry_lost_jobs": 1}})
    audio, _ = synth("1234567890" * 12 + "12")  # 62 s: one segment

    async def scenario() -> dict[str, Any]:
        async with connect(capsd.url) as ws:
            await send_file(ws, "poison", audio, seg=(60, 2))
            first = await asyncio.to_thread(busy_pid, capsd)
            os.kill(first, signal.SIGKILL)
            second = await asyncio.to_thread(busy_pid, capsd, 0, first)  # the same job, run once more
            os.kill(second, signal.SIGKILL)
            return await receive(ws, {"poison"})

    frames = asyncio.run(scenario())
    assert final(frames["poison"])["error"]["code"] == "worker_crashed"
    assert "not run again" in frames["poison"][-1]["error"]["message"]
    assert capsd.logs().count("poison job") == 1
    slot = wait_for(lambda: (s := capsd.status()["slots"][0])["state"] == "ready" and s, 30, "the replacement")
    assert slot["restarts"] == 2 and slot["queue_depth"] == 0  # not queued again
    assert capsd.status()["retries"] == {"retried": 1, "poison_jobs": 1, "paused": False}
    samples, starts = synth("8086")
    assert_exact(asyncio.run(run_client(capsd.url, [("next", "mic", samples, (15, 2))]))["next"], "8086", starts)


def test_with_retry_three_jobs_lost_in_restart_period_pause_retries(start_capsd: Any, heavy_model: Path) -> None:
    capsd = start_capsd({"model": {"dir": str(heavy_model)}, "workers": {"retry_lost_jobs": 1}})
    digits = "1234567890" * 12 + "12"  # 62 s: one segment
    audio, starts = synth(digits)

    async def one(task_id: str) -> dict[str, Any]:
        async with connect(capsd.url) as ws:
            await send_file(ws, task_id, audio, seg=(60, 2))
            os.kill(await asyncio.to_thread(busy_pid, capsd), signal.SIGKILL)
            return (await receive(ws, {task_id}))[task_id]

    for task_id in ("a", "b"):  # two distinct jobs lost: each runs once more
        assert_exact(asyncio.run(one(task_id)), digits, starts)
    third = asyncio.run(one("c"))  # the third within restart_period_s: the machine, not the job
    assert final(third)["error"]["code"] == "worker_crashed"
    assert "not retried while workers keep dying" in third[-1]["error"]["message"]
    assert capsd.logs().count("lost jobs not retried") == 1
    assert capsd.status()["retries"] == {"retried": 2, "poison_jobs": 0, "paused": True}


def test_a_worker_and_its_loader_end_at_once_and_quietly_when_their_supervisor_is_killed(start_capsd: Any, heavy_model: Path) -> None:
    capsd = start_capsd({"model": {"dir": str(heavy_model)}})
    audio, _ = synth("1234567890" * 24)

    loaders = [loader["pid"] for loader in capsd.status()["loaders"]]  # the worker's, unless spawned

    async def scenario() -> int:
        async with connect(capsd.url) as ws:
            await send_file(ws, "orphan", audio, seg=(60, 2))
            pid = await asyncio.to_thread(busy_pid, capsd)
            capsd.proc.kill()
            return pid

    pid = asyncio.run(scenario())
    killed = time.monotonic()

    def gone() -> bool:
        for process in (pid, *loaders):
            try:
                if psutil.Process(process).status() != psutil.STATUS_ZOMBIE:
                    return False
            except psutil.NoSuchProcess:
                pass
        return True

    wait_for(gone, 10, "the worker and its loader to end")
    assert time.monotonic() - killed < 2  # not after its decode (~3 s)
    assert "Traceback" not in capsd.logs() and "BrokenPipeError" not in capsd.logs()
