"""Workers forked from a loader (docs/design.md#workers-forked-from-a-loader): real loaders,
real forks, real kills. The rest of the suite runs with forked workers too (the default)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest

from capsd.models import EMBEDDED_MODEL_DIR
from capsd.selftest.tones import synth
from tests.support.checks import assert_exact, run_client, scrape, task_ids, wait_for
from tests.support.daemon import write_config

pytestmark = pytest.mark.integration


def transcribe_on_every_slot(capsd: Any, count: int, prefix: str) -> None:
    samples, starts = synth("8675309")
    ids = task_ids(count, prefix)
    frames = asyncio.run(run_client(capsd.url, [(task_id, "file", samples, (15, 2)) for task_id in ids]))
    for task_id in ids:
        assert_exact(frames[task_id], "8675309", starts)


def loader(capsd: Any) -> dict[str, Any]:
    (only,) = capsd.status()["loaders"]
    return only


def forked_from_one_loader(capsd: Any) -> bool:
    status = capsd.status()
    return len(status["loaders"]) == 1 and all(
        s["started"] == "fork" and s["state"] == "ready" and psutil.Process(s["pid"]).ppid() == capsd.proc.pid
        for s in status["slots"]
    )


def test_workers_are_forked_from_one_loader_share_its_memory_and_decode_exactly(start_capsd: Any) -> None:
    capsd = start_capsd({"workers": {"count": 2}})
    assert forked_from_one_loader(capsd)  # reparented to capsd, their subreaper
    status = capsd.status()
    assert loader(capsd)["state"] == "ready" and loader(capsd)["model"]["dir"] == str(EMBEDDED_MODEL_DIR)
    for slot in status["slots"]:
        assert slot["private_bytes"] + slot["shared_bytes"] == pytest.approx(slot["rss_bytes"], rel=0.1)
        assert slot["private_bytes"] < slot["shared_bytes"]  # the model and the interpreter are the loader's
    transcribe_on_every_slot(capsd, 2, "forked")
    metrics = scrape(capsd)
    assert metrics[("capsd_worker_private_bytes", (("slot", "0"),))] > 0
    assert metrics[("capsd_loader_rss_bytes", (("model", str(EMBEDDED_MODEL_DIR)), ("pid", str(loader(capsd)["pid"]))))] > 0
    capsd.control(cmd="scale", count=3)  # a new slot: a fork too
    assert forked_from_one_loader(capsd)
    transcribe_on_every_slot(capsd, 3, "scaled")


def test_a_killed_worker_is_replaced_by_a_fork_and_its_exit_code_read(start_capsd: Any) -> None:
    capsd = start_capsd()
    old = capsd.worker_pid(0)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: capsd.status()["slots"][0]["pid"] not in (None, old) and forked_from_one_loader(capsd))
    slot = capsd.status()["slots"][0]
    assert slot["last_exit"]["exitcode"] == -signal.SIGKILL  # reaped by capsd, its parent
    assert "worker ready" in capsd.logs()
    transcribe_on_every_slot(capsd, 1, "after")


def test_the_loader_killed_is_replaced_while_its_workers_keep_serving(start_capsd: Any) -> None:
    capsd = start_capsd({"workers": {"count": 2}})
    first = loader(capsd)["pid"]
    workers = [s["pid"] for s in capsd.status()["slots"]]
    os.kill(first, signal.SIGKILL)
    transcribe_on_every_slot(capsd, 2, "meanwhile")
    wait_for(lambda: capsd.status()["loaders"] and loader(capsd)["pid"] != first and loader(capsd)["state"] == "ready")
    assert [s["pid"] for s in capsd.status()["slots"]] == workers  # untouched
    assert "loader exited: replaced" in capsd.logs() and loader(capsd)["restarts"] == 1
    os.kill(workers[1], signal.SIGKILL)  # its replacement is forked from the new loader
    wait_for(lambda: capsd.status()["slots"][1]["pid"] not in (None, workers[1]) and forked_from_one_loader(capsd))
    transcribe_on_every_slot(capsd, 2, "after")


def test_a_model_change_rolls_onto_the_new_models_loader_and_stops_the_old_one(start_capsd: Any, tmp_path: Path) -> None:
    capsd = start_capsd({"workers": {"count": 2}})
    old = loader(capsd)["pid"]
    new_dir = tmp_path / "model-copy"
    shutil.copytree(EMBEDDED_MODEL_DIR, new_dir)
    write_config(capsd.config_path, {"server": {"port": capsd.port}, "control": {"socket": str(capsd.socket)},
                                     "workers": {"count": 2}, "model": {"dir": str(new_dir)}})  # fmt: skip
    capsd.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "model changed" in capsd.logs(), 60, "the model changed")
    wait_for(lambda: not psutil.pid_exists(old) or psutil.Process(old).status() == psutil.STATUS_ZOMBIE)
    assert loader(capsd)["model"]["dir"] == str(new_dir) and loader(capsd)["pid"] != old
    assert forked_from_one_loader(capsd)
    assert all(s["model"]["dir"] == str(new_dir) for s in capsd.status()["slots"])
    transcribe_on_every_slot(capsd, 2, "new-model")


@pytest.mark.parametrize(
    ("workers", "env", "why"),
    [
        ({"threads": 2}, {}, "[workers] threads = 2"),
        ({"preload": False}, {}, "[workers] preload = false"),
        ({}, {"OPENBLAS_NUM_THREADS": "2"}, "the loader runs 2 threads"),  # a loader that cannot fork
    ],
)
def test_workers_are_spawned_when_they_cannot_be_forked_and_the_log_says_why(
    start_capsd: Any, workers: dict[str, Any], env: dict[str, str], why: str
) -> None:
    capsd = start_capsd({"workers": {"count": 2, **workers}}, env={**os.environ, **env})
    assert all(s["started"] == "spawn" for s in capsd.status()["slots"])
    wait_for(lambda: capsd.status()["loaders"] == [], what="no loader")  # one that cannot fork ends
    assert capsd.logs().count("workers are spawned") == 1
    assert why in capsd.logs()
    transcribe_on_every_slot(capsd, 2, "spawned")


def test_a_hung_loader_is_killed_when_a_fork_misses_load_timeout_s_and_replaced(start_capsd: Any) -> None:
    capsd = start_capsd({"workers": {"load_timeout_s": 3, "restart_intensity": 10}})
    hung, old = loader(capsd)["pid"], capsd.worker_pid(0)
    os.kill(hung, signal.SIGSTOP)  # it cannot fork: the next worker waits for it
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: capsd.status()["slots"][0]["pid"] not in (None, old) and forked_from_one_loader(capsd), 60)
    assert loader(capsd)["pid"] != hung and not psutil.pid_exists(hung)
    assert "worker not ready in time" in capsd.logs() and "loader exited: replaced" in capsd.logs()
    transcribe_on_every_slot(capsd, 1, "after")
