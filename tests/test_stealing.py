"""Every core on every task, with real workers: idle slots decode segments of tasks homed on busy
ones, and a dead worker fails exactly the task whose segment it was decoding."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from capsd.selftest.tones import synth
from tests.support.checks import assert_exact, run_client, task_ids, wait_for
from tests.support.client import connect, receive, send_file

pytestmark = pytest.mark.integration

DIGITS = "1122334455667788990012" * 8  # 88 s: equal digits straddle the segment boundaries


@pytest.mark.parametrize("stealing", [True, False])
def test_one_file_is_decoded_on_both_slots_and_exact(start_capsd: Any, heavy_model: Path, stealing: bool) -> None:
    capsd = start_capsd({"workers": {"count": 2, "work_stealing": stealing}, "model": {"dir": str(heavy_model)}})
    home, _ = task_ids(2)  # homed on slot 0
    samples, starts = synth(DIGITS)  # 6 segments of 15/2
    frames = asyncio.run(run_client(capsd.url, [(home, "file", samples, (15, 2))]))
    assert_exact(frames[home], DIGITS, starts)
    slots = capsd.status()["slots"]
    assert slots[0]["tasks_done"] == 1 and slots[1]["tasks_done"] == 0  # its home keeps its count
    if stealing:
        assert slots[0]["segments_decoded"] > 0 and slots[1]["segments_decoded"] > 0
    else:  # strict partitions: the home slot decodes it all
        assert slots[0]["segments_decoded"] == 6 and slots[1]["segments_decoded"] == 0


def test_a_kill_mid_decode_fails_the_task_homed_elsewhere_and_nothing_else(start_capsd: Any, heavy_model: Path) -> None:
    capsd = start_capsd({"workers": {"count": 2}, "model": {"dir": str(heavy_model)}})
    on0, on1 = task_ids(2)
    samples, _ = synth(DIGITS)
    short, short_starts = synth("31337")

    async def scenario() -> dict[str, Any]:
        async with connect(capsd.url) as ws:
            await send_file(ws, on0, samples, seg=(15, 2))  # slot 1 has nothing of its own: it helps
            await asyncio.to_thread(wait_for, lambda: capsd.status()["slots"][1]["state"] == "busy", 30, "slot 1 busy")
            os.kill(capsd.worker_pid(1), signal.SIGKILL)
            frames = await receive(ws, {on0})
        after = await run_client(capsd.url, [(on0 + "-after", "mic", short, (15, 2)), (on1, "file", short, (15, 2))])
        return frames | after

    frames = asyncio.run(scenario())
    assert frames[on0][-1]["error"]["code"] == "worker_crashed"
    assert [f["is_final"] for f in frames[on0]].count(True) == 1
    assert_exact(frames[on0 + "-after"], "31337", short_starts)
    assert_exact(frames[on1], "31337", short_starts)
    slots = capsd.status()["slots"]
    assert slots[0]["tasks_failed"] == 1 and slots[1]["tasks_failed"] == 0  # counted at the task's home
    assert slots[1]["restarts"] == 1 and slots[1]["last_exit"]["reason"] == "crashed"
    assert capsd.logs().count("task failed") == 1


def test_a_worker_not_ready_within_load_timeout_s_is_a_startup_failure(start_capsd: Any) -> None:
    capsd = start_capsd({"workers": {"load_timeout_s": 0.01}}, wait=False)
    assert capsd.proc.wait(60) == 78
    assert "was not ready within load_timeout_s" in capsd.logs()


def test_a_replacement_not_ready_in_time_is_a_crash(start_capsd: Any) -> None:
    # Spawned: a worker forked from a loader can be ready within 0.01 s.
    capsd = start_capsd({"workers": {"restart_intensity": 2, "preload": False}})
    capsd.config_path.write_text(capsd.config_path.read_text().replace("[workers]\n", "[workers]\nload_timeout_s = 0.01\n"))
    capsd.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "config reloaded" in capsd.logs(), 30, "the reload")
    os.kill(capsd.worker_pid(0), signal.SIGKILL)  # each replacement is then killed while loading
    assert capsd.proc.wait(60) == 70
    assert "worker not ready in time" in capsd.logs() and "restart intensity exceeded" in capsd.logs()
