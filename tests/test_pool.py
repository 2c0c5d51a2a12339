"""Changing the pool while it serves, with real processes: scale, a model change by SIGHUP, the
memory plan that learns (docs/design.md#changing-the-pool)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from capsd.models import EMBEDDED_MODEL_DIR
from capsd.selftest.tones import synth
from tests.support.checks import (
    assert_exact,
    http_get,
    most_slots_down,
    run_client,
    stop_loading_workers,
    task_ids,
    wait_for,
)
from tests.support.client import connect, frame, receive, send_file, send_mic
from tests.support.daemon import peak_rss

pytestmark = pytest.mark.integration

FILE_DIGITS, MIC_DIGITS = "1234567890" * 12, "4711" * 5  # 60 s and 10 s


def capsctl(capsd: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "capsd.ctl", "--socket", str(capsd.socket), *args],
                          capture_output=True, text=True)  # fmt: skip


def load(url: str, tag: str) -> Any:
    """Two file tasks and a dictation spoken in real time (10 s), each from its own connection."""
    file_audio, _ = synth(FILE_DIGITS)
    mic_audio, _ = synth(MIC_DIGITS)
    files = [run_client(url, [(f"{tag}-file-{i}", "file", file_audio, (15, 2))]) for i in range(2)]
    return asyncio.gather(*files, dictate(url, f"{tag}-mic", mic_audio))


async def dictate(url: str, task_id: str, samples: Any) -> dict[str, Any]:
    async with connect(url) as ws:
        await send_mic(ws, task_id, samples, frame_s=0.1, pace=0.1)
        return await receive(ws, {task_id})


def assert_all_exact(results: list[dict[str, Any]], tag: str) -> None:
    frames: dict[str, Any] = {}
    for result in results:
        frames |= result
    _, file_starts = synth(FILE_DIGITS)
    _, mic_starts = synth(MIC_DIGITS)
    for i in range(2):
        assert_exact(frames[f"{tag}-file-{i}"], FILE_DIGITS, file_starts)
    assert_exact(frames[f"{tag}-mic"], MIC_DIGITS, mic_starts)


def test_capsctl_grows_restarts_and_shrinks_the_pool_and_every_slot_serves_exactly(start_capsd: Any) -> None:
    """Each change capsctl makes to the pool, once, then a task on every slot: the integration test
    that .ci/run also runs on the oldest Python capsd supports."""
    capsd = start_capsd()
    samples, starts = synth("2718")

    def exact_on_every_slot(tag: str) -> None:
        ids = task_ids(len(capsd.status()["slots"]), tag)
        frames = asyncio.run(run_client(capsd.url, [(task_id, "mic", samples, (15, 2)) for task_id in ids]))
        for task_id in ids:
            assert_exact(frames[task_id], "2718", starts)

    exact_on_every_slot("one")
    grown = capsctl(capsd, "scale", "2")
    assert grown.returncode == 0 and "1 -> 2 slots" in grown.stdout, grown.stderr
    exact_on_every_slot("grown")
    old = [capsd.worker_pid(i) for i in range(2)]
    restarted = capsctl(capsd, "restart-worker", "all")
    assert restarted.returncode == 0, restarted.stderr
    new = [capsd.worker_pid(i) for i in range(2)]
    assert set(old).isdisjoint(new)
    assert restarted.stdout.splitlines() == [f"slot {i}: old pid {old[i]}, new pid {new[i]}" for i in range(2)]
    exact_on_every_slot("restarted")
    shrunk = capsctl(capsd, "scale", "1")
    assert shrunk.returncode == 0 and "2 -> 1 slots" in shrunk.stdout, shrunk.stderr
    wait_for(lambda: len(capsd.status()["slots"]) == 1, 30, "slot 1 to go")
    exact_on_every_slot("shrunk")
    assert capsd.status()["slots"][0]["tasks_failed"] == 0


def test_scale_2_to_3_to_1_while_tasks_stream_fails_nothing(start_capsd: Any) -> None:
    # Without stealing, a slot scaled away can only be emptied by handing its jobs over.
    capsd = start_capsd({"workers": {"count": 2, "work_stealing": False}})
    samples, starts = synth(FILE_DIGITS)

    async def scenario() -> dict[str, Any]:
        growing = load(capsd.url, "grow")
        grown = await asyncio.to_thread(capsctl, capsd, "scale", "3")
        assert grown.returncode == 0, grown.stderr
        assert "2 -> 3 slots" in grown.stdout
        assert_all_exact(await growing, "grow")
        slots = capsd.status()["slots"]
        assert [s["slot"] for s in slots] == [0, 1, 2] and all(s["state"] == "ready" for s in slots)
        assert 'capsd_queue_depth{slot="2"}' in http_get(capsd.port, "/metrics")[1]  # metrics follow
        # A task homed on slot 2 under the new count, its worker stopped mid-job so that its
        # segments wait in slot 2's queue when the pool shrinks under it.
        kept = task_ids(3, "kept", slots=[2])[0]
        worker = capsd.worker_pid(2)
        os.kill(worker, signal.SIGSTOP)
        try:
            async with connect(capsd.url) as ws:
                await send_file(ws, kept, samples, seg=(15, 2))
                await asyncio.to_thread(wait_for, lambda: capsd.status()["slots"][2]["queue_depth"] >= 3, 30)
                shrinking = asyncio.create_task(asyncio.to_thread(capsctl, capsd, "scale", "1"))
                await asyncio.to_thread(wait_for, lambda: capsd.status()["slots"][2]["state"] == "draining", 30)
                status = capsd.status()
                assert status["slots"][2]["queue_depth"] == 0  # handed over to slot 0
                assert status["slots"][2]["tasks_in_progress"] == 1  # still its home
                during = load(capsd.url, "shrink")  # new tasks meanwhile: all to slot 0
                os.kill(worker, signal.SIGCONT)  # the job in hand finishes, then the worker stops
                shrunk = await shrinking
                assert shrunk.returncode == 0, shrunk.stderr
                assert_all_exact(await during, "shrink")
                return await receive(ws, {kept})
        finally:
            with contextlib.suppress(ProcessLookupError):  # gone once it has stopped
                os.kill(worker, signal.SIGCONT)

    frames = asyncio.run(scenario())
    assert_exact(frames[next(iter(frames))], FILE_DIGITS, starts)
    wait_for(lambda: [s["slot"] for s in capsd.status()["slots"]] == [0], 10, "slots 1 and 2 to go")
    status = capsd.status()
    assert status["slots"][0]["tasks_failed"] == 0 and status["slots"][0]["restarts"] == 0
    assert "pool scaled" in capsd.logs() and "slot removed" in capsd.logs()
    depths = [line.split()[0] for line in http_get(capsd.port, "/metrics")[1].splitlines()
              if line.startswith("capsd_queue_depth{")]  # fmt: skip
    assert depths == ['capsd_queue_depth{slot="0"}']


def test_a_scale_the_memory_plan_refuses_changes_nothing(start_capsd: Any) -> None:
    capsd = start_capsd({"workers": {"count": 2}})
    before = capsd.status()
    refused = capsctl(capsd, "scale", "100000")
    assert refused.returncode == 75, refused.stderr  # its own exit code (EX_TEMPFAIL)
    assert "memory plan does not fit: 100000 workers" in refused.stderr and "capsctl scale" in refused.stderr
    after = capsd.status()
    assert [(s["slot"], s["pid"]) for s in after["slots"]] == [(s["slot"], s["pid"]) for s in before["slots"]]
    assert capsctl(capsd, "scale", "0").returncode == 64
    huge = capsctl(capsd, "scale", "9" * 400)  # refused by capsd as a bad request, by its kind, not its text
    assert huge.returncode == 64 and "allowed is a number of slots" in huge.stderr, huge.stderr
    samples, starts = synth("31337")
    assert_exact(asyncio.run(run_client(capsd.url, [("after", "mic", samples, (15, 2))]))["after"], "31337", starts)


def change_model(capsd: Any, model_dir: Path) -> None:
    text = capsd.config_path.read_text()
    capsd.config_path.write_text(text + f'[model]\ndir = "{model_dir}"\n')
    capsd.proc.send_signal(signal.SIGHUP)


def test_a_new_model_by_sighup_rolls_in_under_load(start_capsd: Any, heavy_model: Path) -> None:
    capsd = start_capsd({"workers": {"count": 2}})
    old = [capsd.worker_pid(i) for i in range(2)]

    tasks: list[int] = []  # tasks in progress while it rolls

    async def scenario() -> list[dict[str, Any]]:
        during = load(capsd.url, "roll")
        await asyncio.sleep(0.5)  # the dictation has begun
        change_model(capsd, heavy_model)
        deadline = time.monotonic() + 120
        while "model changed" not in capsd.logs():
            assert time.monotonic() < deadline, "no model change in 120 s"
            tasks.append(sum(s["tasks_in_progress"] for s in capsd.status()["slots"]))
            await asyncio.sleep(0.05)
        return await during

    assert_all_exact(asyncio.run(scenario()), "roll")
    # One slot at a time, from every state change the log has (a fork is ready too soon to be
    # seen down by polling status), while tasks ran.
    assert most_slots_down(capsd.logs().split("config reloaded", 1)[1], 2) == 1
    assert any(tasks)
    status = capsd.status()
    assert all(s["model"]["dir"] == str(heavy_model) for s in status["slots"])
    assert set(old).isdisjoint(s["pid"] for s in status["slots"])
    assert all(s["tasks_failed"] == 0 for s in status["slots"])
    assert "worker above its memory estimate" not in capsd.logs()  # each worker against its own model's
    samples, starts = synth("2718")  # and the new model serves
    assert_exact(asyncio.run(run_client(capsd.url, [("after", "mic", samples, (15, 2))]))["after"], "2718", starts)


def test_a_model_change_to_a_missing_file_is_refused_and_the_old_model_kept(start_capsd: Any, tmp_path: Path) -> None:
    capsd = start_capsd()
    pid = capsd.worker_pid(0)
    change_model(capsd, tmp_path / "no-such-model")
    wait_for(lambda: "model change refused" in capsd.logs(), 30, "the refusal")
    assert "does not exist" in capsd.logs()
    slot = capsd.status()["slots"][0]
    assert slot["pid"] == pid and slot["model"]["dir"] == str(EMBEDDED_MODEL_DIR)


def test_a_model_that_does_not_load_is_rolled_back(start_capsd: Any, tmp_path: Path) -> None:
    capsd = start_capsd({"workers": {"count": 2}})
    broken = tmp_path / "broken"
    shutil.copytree(EMBEDDED_MODEL_DIR, broken)
    for onnx in broken.glob("*.onnx"):
        onnx.write_bytes(b"not an onnx model")  # passes the file checks, fails to load
    change_model(capsd, broken)
    wait_for(lambda: "model change failed" in capsd.logs(), 60, "the roll back")
    wait_for(lambda: all(s["state"] == "ready" for s in capsd.status()["slots"]), 60, "every slot ready")
    assert all(s["model"]["dir"] == str(EMBEDDED_MODEL_DIR) for s in capsd.status()["slots"])
    samples, starts = synth("1618")
    assert_exact(asyncio.run(run_client(capsd.url, [("after", "mic", samples, (15, 2))]))["after"], "1618", starts)


@pytest.mark.parametrize("preload", [False, True])
def test_the_plan_learns_the_peak_workers_measured(start_capsd: Any, preload: bool) -> None:
    capsd = start_capsd({"workers": {"preload": preload}})
    estimate = capsd.status()["memory"]["worker_bytes"]
    samples, _ = synth("1234567890" * 24)  # 120 s, one segment: the longest a client may send
    asyncio.run(run_client(capsd.url, [("long", "file", samples, (60, 59.99))]))
    pid = capsd.worker_pid(0)
    hwm = peak_rss(pid)
    memory = wait_for(lambda: (m := capsd.status()["memory"])["worker_peak_bytes"] and m, 10, "a measured peak")
    if preload:  # a forked worker's peak is what it holds alone, far below its RSS
        assert 0.9 * capsd.status()["slots"][0]["private_bytes"] <= memory["worker_peak_bytes"] < hwm / 2
    else:
        assert 0.9 * hwm <= memory["worker_peak_bytes"] <= hwm
    assert memory["worker_bytes"] == max(estimate, memory["worker_peak_bytes"])


def test_a_new_slot_whose_worker_does_not_load_leaves_the_pool_as_it_was(start_capsd: Any, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(EMBEDDED_MODEL_DIR, model)
    capsd = start_capsd({"model": {"dir": str(model)}, "workers": {"preload": False}})  # a fork would not load
    pid = capsd.worker_pid(0)
    for onnx in model.glob("*.onnx"):  # the running worker has loaded it; a new one cannot
        onnx.write_bytes(b"not an onnx model")
    failed = capsctl(capsd, "scale", "2")
    assert failed.returncode == 1 and "did not load; the pool keeps 1 slots" in failed.stderr, failed.stderr
    wait_for(lambda: len(capsd.status()["slots"]) == 1, 10, "the new slot to go")
    assert capsd.worker_pid(0) == pid and capsd.proc.poll() is None
    assert "cannot load the model" in capsd.logs() and "Traceback" not in capsd.logs()  # one line
    samples, starts = synth("42")
    assert_exact(asyncio.run(run_client(capsd.url, [("after", "mic", samples, (15, 2))]))["after"], "42", starts)


def reload(capsd: Any, text: str) -> None:
    """Write the config and SIGHUP, once capsd has read it (a reload's change may still be under way)."""
    reloads = capsd.logs().count("config reloaded")
    capsd.config_path.write_text(text)
    capsd.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: capsd.logs().count("config reloaded") > reloads, 30, "the reload")


def test_of_two_reloads_during_one_change_the_last_wins(start_capsd: Any, heavy_model: Path) -> None:
    capsd = start_capsd({"workers": {"count": 2}})
    config = capsd.config_path.read_text()
    reload(capsd, config.replace("count = 2", "count = 3"))
    reload(capsd, config)  # while slot 2 loads
    wait_for(lambda: capsd.logs().count("pool scaled") == 2, 60, "3 slots, then 2")
    wait_for(lambda: len(capsd.status()["slots"]) == 2, 30, "2 slots")
    reload(capsd, config + f'[model]\ndir = "{heavy_model}"\n')
    reload(capsd, config)  # flipped back while the first roll is under way
    wait_for(lambda: capsd.logs().count("model changed") == 2, 120, "the roll there and back")
    status = capsd.status()
    assert [s["model"]["dir"] for s in status["slots"]] == [str(EMBEDDED_MODEL_DIR)] * 2
    samples, starts = synth("1066")
    assert_exact(asyncio.run(run_client(capsd.url, [("after", "mic", samples, (15, 2))]))["after"], "1066", starts)


def test_a_roll_whose_new_worker_misses_load_timeout_s_is_rolled_back_for_good(
    start_capsd: Any, heavy_model: Path
) -> None:
    capsd = start_capsd({"workers": {"load_timeout_s": 5, "preload": False}})  # a spawned worker, held while it loads
    old = capsd.worker_pid(0)
    change_model(capsd, heavy_model)
    stopped = stop_loading_workers(capsd, old=(old,))  # the new model's worker, stopped while it loads
    wait_for(lambda: "model change failed" in capsd.logs(), 60, "the roll back")
    wait_for(lambda: capsd.status()["slots"][0]["state"] == "ready", 60, "the slot ready")
    assert "worker not ready in time" in capsd.logs()
    assert capsd.status()["slots"][0]["model"]["dir"] == str(EMBEDDED_MODEL_DIR)
    restarted = capsctl(capsd, "restart-worker", "0")  # its next worker runs the old model too
    assert restarted.returncode == 0, restarted.stderr
    assert capsd.status()["slots"][0]["model"]["dir"] == str(EMBEDDED_MODEL_DIR)
    assert all(not p.is_running() or p.status() == "zombie" for p in stopped)


def test_a_slot_scaled_away_and_back_while_its_spawn_backs_off_gets_one_worker(start_capsd: Any) -> None:
    """Slot 1's replacement cannot be spawned (capsd may open no descriptor) and is retried with
    backoff; meanwhile the slot is scaled away (it still homes a task, so it stays) and back. The
    pending retry must not start a second worker beside the one the scale started."""
    capsd = start_capsd({"workers": {"count": 2, "restart_intensity": 50}})
    task_id = task_ids(2, "held", slots=[1])[0]
    samples, starts = synth("5150")

    async def scenario() -> dict[str, Any]:
        async with connect(capsd.url) as ws:
            await ws.send(frame(task_id, samples, False, "mic", (15, 2)))  # open: slot 1 cannot go
            await asyncio.to_thread(starve_and_scale, capsd)
            await ws.send(frame(task_id, samples[:0], True, "mic", (15, 2)))
            return await receive(ws, {task_id})

    assert_exact(asyncio.run(scenario())[task_id], "5150", starts)
    time.sleep(10)  # past the retry that was pending
    status = capsd.status()
    loaders = {loader["pid"] for loader in status["loaders"]}
    workers = [p.pid for p in psutil.Process(capsd.proc.pid).children()
               if "spawn_main" in " ".join(p.cmdline()) and p.pid not in loaders]  # fmt: skip
    assert sorted(workers) == sorted(s["pid"] for s in status["slots"]), workers


def starve_and_scale(capsd: Any) -> None:
    supervisor = psutil.Process(capsd.proc.pid)
    limits = supervisor.rlimit(psutil.RLIMIT_NOFILE)
    worker = capsd.worker_pid(1)
    supervisor.rlimit(psutil.RLIMIT_NOFILE, (3, limits[1]))  # no new descriptor, so no new worker
    try:
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: "retry_in_s=8.0" in capsd.logs(), 60, "the spawn to back off")
    finally:
        supervisor.rlimit(psutil.RLIMIT_NOFILE, limits)
    for count in ("1", "2"):
        scaled = capsctl(capsd, "scale", count)
        assert scaled.returncode == 0, scaled.stderr


def test_a_reload_during_a_stop_is_ignored(start_capsd: Any, heavy_model: Path) -> None:
    capsd = start_capsd({"model": {"dir": str(heavy_model)}})
    audio, starts = synth(FILE_DIGITS)

    async def scenario() -> dict[str, Any]:
        async with connect(capsd.url) as ws:
            await send_file(ws, "finishing", audio, seg=(15, 2))
            await asyncio.to_thread(wait_for, lambda: capsd.status()["slots"][0]["state"] == "busy", 30, "busy")
            capsd.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(wait_for, lambda: "stopping" in capsd.logs(), 30, "stopping")
            capsd.config_path.write_text(capsd.config_path.read_text() + "[workers]\ncount = 2\n")
            capsd.proc.send_signal(signal.SIGHUP)
            return await receive(ws, {"finishing"})

    assert_exact(asyncio.run(scenario())["finishing"], FILE_DIGITS, starts)
    assert capsd.proc.wait(60) == 0
    logs = capsd.logs()
    assert "reload ignored: capsd is stopping" in logs and "pool scaled" not in logs and "critical" not in logs
