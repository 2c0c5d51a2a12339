"""What the benchmarks share beyond the tests' support (tests/support): the machine's description,
the models, CapsWriter-like clients, starting capsd and reading its memory."""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from capsd.models import EMBEDDED_MODEL_DIR
from capsd.protocol import RATE
from capsd.selftest.build import build_paraformer
from capsd.selftest.tones import synth, token_digits
from tests.support.client import connect, receive, send_mic
from tests.support.daemon import Capsd, peak_rss

SLOT_S = 0.5  # synth: one digit per 0.3 s tone + 0.2 s gap, after 0.2 s of silence
MIC_FRAME_S = 0.1  # CapsWriter's mic client: small frames, seg_duration 15, seg_overlap 2 (send_mic's defaults)


def machine() -> str:
    """CPU, cores, memory, versions and load: what a reader needs to compare runs."""
    import sherpa_onnx

    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )  # fmt: skip
    return (
        f"{cpu}, {psutil.cpu_count(logical=False)} cores / {os.cpu_count()} threads,"
        f" {psutil.virtual_memory().total / 2**30:.1f} GiB; {platform.system()} {platform.release()};"
        f" Python {platform.python_version()}; sherpa-onnx {sherpa_onnx.__version__};"
        f" load average {os.getloadavg()[0]:.2f} at start"
    )


def models(tmp: Path) -> dict[str, Path]:
    """The embedded self-test model and the CPU-heavy one, built into `tmp`."""
    heavy = tmp / "heavy"
    build_paraformer(heavy, heavy=True)
    return {"self-test": EMBEDDED_MODEL_DIR, "heavy": heavy}


def tone_file(seconds: float, seed: int) -> tuple[np.ndarray, str]:
    """Random digits as tones, padded with silence to exactly `seconds`."""
    digits = "".join(map(str, np.random.default_rng(seed).integers(0, 10, int((seconds - 0.2) / SLOT_S))))
    samples, _ = synth(digits)
    return np.pad(samples, (0, round(seconds * RATE) - len(samples))), digits


async def _one_connection(url: str, task_id: str, frames: list[str]) -> dict[str, Any]:
    async with connect(url) as ws:
        for frame in frames:
            await ws.send(frame)
        return (await receive(ws, {task_id}, timeout=600))[task_id][-1]


def transcribe(url: str, tasks: dict[str, list[str]]) -> tuple[float, dict[str, dict[str, Any]]]:
    """Send every task's frames on a connection of its own, all at once; wall seconds and final frames."""

    async def run() -> list[dict[str, Any]]:
        return await asyncio.gather(*(_one_connection(url, t, frames) for t, frames in tasks.items()))

    start = time.perf_counter()
    finals = asyncio.run(run())
    return time.perf_counter() - start, dict(zip(tasks, finals))


def check_exact(final: dict[str, Any], digits: str) -> None:
    """A fast wrong answer must not win: every digit, once, in order."""
    if "error" in final or token_digits(final["tokens"]) != digits:
        raise SystemExit(f"wrong result for {final['task_id']}: {final.get('error') or final['text'][:80]}")


async def dictate(url: str, dictations: list[tuple[str, np.ndarray, str]]) -> list[float]:
    """CapsWriter's mic client on one connection, one dictation after another, each paced at real
    time and ended by the empty final frame: seconds from that frame to the final result, each exact."""
    latencies = []
    async with connect(url) as ws:
        for task_id, samples, digits in dictations:
            await send_mic(ws, task_id, samples, frame_s=MIC_FRAME_S, pace=MIC_FRAME_S)
            sent = time.perf_counter()
            final = (await receive(ws, {task_id}, timeout=120))[task_id][-1]
            latencies.append(time.perf_counter() - sent)
            check_exact(final, digits)
    return latencies


async def keep_busy(
    url: str, task_id: str, frames: list[str], digits: str, answered: list[str], limit: int = 100
) -> None:
    """A file client sending the same file again each time it is answered (so, with the same task
    id, encoded once) until cancelled; each answer is checked and appended to `answered`."""
    async with connect(url) as ws:
        for _ in range(limit):
            for frame in frames:
                await ws.send(frame)
            check_exact((await receive(ws, {task_id}, timeout=600))[task_id][-1], digits)
            answered.append(task_id)


def start_capsd(
    tmp: Path,
    model_dir: Path,
    count: int,
    threads: int,
    work_stealing: bool = True,
    metrics: bool = True,
    preload: bool = True,
) -> tuple[Capsd, float]:
    """A capsd with `count` workers in a new directory under `tmp`, and its time to ready: seconds
    from starting its process until it says it is ready (Capsd.wait_ready, polled every 20 ms).
    `preload`: workers forked from a loader (docs/design.md#workers-forked-from-a-loader), else spawned."""
    directory = Path(tempfile.mkdtemp(prefix=f"w{count}-", dir=tmp))
    workers = {"count": count, "threads": threads, "work_stealing": work_stealing, "preload": preload}
    config = {"server": {"metrics": metrics}, "workers": workers, "model": {"dir": str(model_dir)}}
    start = time.perf_counter()
    daemon = Capsd(directory, config, wait=False)
    try:
        daemon.wait_ready()
    except AssertionError:
        daemon.stop()
        raise
    return daemon, time.perf_counter() - start


def rss(daemon: Capsd, peak: bool = False) -> tuple[int, list[int]]:
    """RSS of the supervisor (the daemon's process and its children that are neither workers nor
    loaders, such as multiprocessing's resource tracker) and of each worker, in slot order; with
    `peak`, the most each process has had resident since it started (VmHWM)."""
    status = daemon.status()
    workers = [slot["pid"] for slot in status["slots"]]
    others = {*workers, *(loader["pid"] for loader in status["loaders"])}
    process = psutil.Process(daemon.proc.pid)
    supervisor = [p.pid for p in [process, *process.children(True)] if p.pid not in others]
    measure = peak_rss if peak else lambda pid: psutil.Process(pid).memory_info().rss
    return sum(map(measure, supervisor)), [measure(pid) for pid in workers]


def family(daemon: Capsd) -> list[psutil.Process]:
    """capsd's process and all its descendants: loaders, workers, multiprocessing's resource tracker."""
    process = psutil.Process(daemon.proc.pid)
    return [process, *process.children(recursive=True)]


def pss(processes: list[psutil.Process]) -> int:
    """The sum of their proportional set sizes: each page shared by k processes counts 1/k in
    each, so every page they hold counts once, however many of them share it (proc(5), smaps)."""
    return sum(p.memory_full_info().pss for p in processes)


def conclude(name: str, problems: list[str], log_path: Path, tmp: str | Path) -> int:
    """A soak's last lines and exit status: PASS (its temporary directory removed), or FAIL with
    each problem and the capsd log kept."""
    for problem in problems:
        print(f"  problem: {problem}")
    if problems:
        print(f"capsd log kept: {log_path}\n{name}: FAIL ({len(problems)} problems)")
        return 1
    shutil.rmtree(tmp)
    print(f"{name}: PASS")
    return 0
