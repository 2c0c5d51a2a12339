#!/usr/bin/env python3
"""Memory plan against measured memory: calibrates the constants in capsd/memory.py.

For the self-test model and the CPU-heavy one, a real capsd with 1, 2 and 4 workers, forked from
a loader ([workers] preload = true, docs/design.md#workers-forked-from-a-loader) and spawned
(preload = false), and 1 worker with 2 threads (spawned by design), is sent, on every slot at
once, a task cut into one segment of the longest length the contract allows: seg_duration 60,
seg_overlap 59.99, so 119.99 s, against LONGEST_SEGMENT_S = 120 in the plan (onnxruntime's arena
keeps the peak of the longest input, docs/design.md#the-arena-keeps-its-peak). This is repeated
--decodes times, since a worker's memory may still creep up over the first few long decodes.

Before the last round, the workers are stopped while clients send never-final tasks of the
longest frames capsd admits ([server] max_message_bytes, 16 MiB: 196 s of audio; segments of
25 + 2 s), on more
connections than the intake's budget holds (docs/design.md#intake), until it is full; then the
workers go on and the round is decoded while those clients keep sending: the supervisor is
planned for all the intake admits, however fast the model drains it.

Measured, against capsd's own plan for that config (capsd.preflight.check):
- a worker (the largest): a spawned one's peak RSS (VmHWM), which is what an OOM kill or a cgroup
  limit meets; a forked one's peak USS, what it held alone (the model's pages are the loader's,
  shared copy-on-write): its peak RSS less what it shares at the end (worker_memory says why that
  is exact enough). Its USS after the last round ("now") is not its peak: the arena keeps its
  peak, but the audio's copies, its features and the pickled job live only during the decode and
  go back to the system (capsd.memory.hand_back_freed_memory), 27 MiB for a 120 s segment.
  "loaded" is the same figure as "now" (RSS if spawned, USS if forked) when the worker is ready,
  before any decode;
- the loader (forked rows): its peak RSS (VmHWM), against the plan's loader_bytes;
- the supervisor: the peak RSS of the daemon's process plus multiprocessing's resource tracker;
- the total: the sum of the PSS of capsd and all its descendants (loader, workers, resource
  tracker), sampled every SAMPLE_S through the last round while the flood holds the intake full,
  and once more at its end; the largest sum. PSS divides each page among the processes that map
  it, so the sum counts every page once: the model a loader shares with N workers once, not
  N + 1 times as a sum of RSS would, nor zero times as a sum of USS would; shared libraries once
  too. It is the memory the processes hold together, which a sum of RSS overstates more with
  every forked worker.
Printed: estimate, measured and the ratio estimate / measured per part. The estimate must never
be below the measured figure. Spawned rows: at most 1.3x for the worker and the supervisor.
Forked rows: a forked worker's plan is its decode's working memory plus a small baseline, tens of
MiB, where a few MiB of slack are a large ratio; so at most 1.3x measured or 16 MiB above it,
whichever is more, for the worker and the loader, and 1.3x for the supervisor. The total: at most
2x in every row. The plan adds every process's peak RSS, as if all came at once (each worker busy
with a longest segment while the intake is full), and counts the shared libraries in each
process; the PSS sum counts them once, at moments sampled: 1.3-2.0x in both modes on the first
calibration (docs/benchmarks.md#memory-calibration), so a forked row's total is no looser than a
spawned one's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from bench.common import check_exact, family, machine, models, pss, rss, tone_file, transcribe
from capsd.protocol import LONGEST_SEGMENT_S
from tests.support.checks import task_ids, wait_for
from tests.support.client import connect, file_frames, frame
from tests.support.daemon import Capsd, peak_rss

MIB = 2**20
LONGEST_SEG = (60.0, 59.99)  # seg_duration <= 60, seg_overlap < seg_duration (docs/design.md#the-protocol)
HIGH = 1.3  # estimate / measured, at most (the module's docstring says for what)
TOTAL_HIGH = 2.0
FORKED_SLACK_BYTES = 16 * MIB
# (workers, threads, forked from a loader); 2 threads are spawned by design.
ROWS = [(count, 1, preload) for preload in (True, False) for count in (1, 2, 4)] + [(1, 2, False)]
SAMPLE_S = 0.25  # the total's PSS, sampled through the last round
PARTS = {"worker": 6, "loader": 12, "supervisor": 16, "total": 10}  # column widths
FLOOD_FRAME_S = 196  # the longest frame the default max_message_bytes admits (JSON, base64 float32)
# Cut at once into segments that wait: with LONGEST_SEG the flood's audio would wait uncut, and
# the intake's bound for that refuses the bench's own tasks (docs/design.md#intake).
FLOOD_SEG = (25.0, 2.0)


@contextlib.contextmanager
def flooded(capsd: Capsd, count: int) -> Iterator[None]:
    """Meanwhile, clients send never-final tasks of the longest frames, as fast as capsd reads
    them (in a thread of their own, so the bench's own clients are not delayed); it begins with
    the intake full, filled while the workers were stopped."""
    samples, _ = tone_file(FLOOD_FRAME_S, seed=7)
    url, workers = capsd.url, [capsd.worker_pid(slot) for slot in range(count)]
    done = threading.Event()

    async def client(task_id: str) -> None:
        async with connect(url) as ws:
            message = frame(task_id, samples, False, "file", FLOOD_SEG)
            while not done.is_set():
                await ws.send(message)  # waits while capsd does not read

    async def flood() -> None:
        clients = [asyncio.create_task(client(f"flood-{n}")) for n in range(count + 4)]
        await asyncio.to_thread(done.wait)
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)

    def full() -> bool:
        intake = capsd.status()["intake"]
        return intake["connections_waiting"] > 0 and intake["held_bytes"] >= intake["budget_bytes"] - 16 * MIB

    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    thread = threading.Thread(target=asyncio.run, args=(flood(),))
    thread.start()
    try:
        wait_for(full, 120, "the intake full")
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        yield
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        done.set()
        thread.join()


def worker_memory(capsd: Capsd, forked: bool, peak: bool = False) -> int:
    """The largest worker's figure that its plan covers: RSS if spawned (with `peak`, VmHWM), USS
    if forked. A forked worker's peak USS is its peak RSS less what it shares now: the pages it
    shares with its loader only grow once its first decode has read the model, so at its peak in a
    later decode it shared as much as it does now."""
    pids = [slot["pid"] for slot in capsd.status()["slots"]]
    if not forked:
        return max(map(peak_rss, pids)) if peak else max(rss(capsd)[1])
    infos = {pid: psutil.Process(pid).memory_full_info() for pid in pids}
    if not peak:
        return max(info.uss for info in infos.values())
    return max(peak_rss(pid) - (info.rss - info.uss) for pid, info in infos.items())


@contextlib.contextmanager
def largest_pss(capsd: Capsd, sums: list[int]) -> Iterator[None]:
    """Meanwhile, the sum of PSS of capsd and its descendants, every SAMPLE_S, appended to `sums`
    (and once more at the end)."""
    processes = family(capsd)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_S):
            sums.append(pss(processes))

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        sums.append(pss(processes))


def measure(
    tmp: Path, model_dir: Path, count: int, threads: int, decodes: int, exact: bool, preload: bool = True
) -> dict[str, Any]:
    """Start capsd, decode the longest segment `decodes` times on every slot, read memory and the plan."""
    seconds = sum(LONGEST_SEG)
    workers = {"count": count, "threads": threads, "preload": preload}
    # The API off: its share of the plan (capsd.memory.API_*) is measured on its own (docs/benchmarks.md).
    capsd = Capsd(tmp, {"workers": workers, "model": {"dir": str(model_dir)}, "api": {"port": 0}})
    try:
        status = capsd.status()
        forked = {slot["started"] for slot in status["slots"]} == {"fork"}
        loaded = worker_memory(capsd, forked)
        sums: list[int] = []
        for n in range(decodes):
            tasks = {}
            for slot, task_id in enumerate(task_ids(count)):
                samples, digits = tone_file(seconds, seed=100 * n + slot)
                tasks[task_id] = (file_frames(task_id, samples, seg=LONGEST_SEG), digits)
            last = n == decodes - 1
            with (
                flooded(capsd, count) if last else contextlib.nullcontext(),
                largest_pss(capsd, sums) if last else contextlib.nullcontext(),
            ):
                _, finals = transcribe(capsd.url, {t: frames for t, (frames, _) in tasks.items()})
            for task_id, (_, digits) in tasks.items():
                if exact:
                    check_exact(finals[task_id], digits)
        now, peak = worker_memory(capsd, forked), worker_memory(capsd, forked, peak=True)
        supervisor, _ = rss(capsd, peak=True)
        loader = sum(peak_rss(loader["pid"]) for loader in capsd.status()["loaders"])
        planned = capsd.status()["memory"]["planned_bytes"]
    finally:
        capsd.stop()
    plan = capsd.plan()
    assert plan.total_bytes == planned, "the bench's plan differs from the daemon's"
    assert bool(plan.loader_bytes) == forked, "the plan counts a loader where workers are spawned, or none where forked"
    return {
        "forked": forked,
        "loaded": loaded,
        "now": now,
        "parts": {  # estimate, measured
            "worker": (plan.worker_bytes, peak),
            "loader": (plan.loader_bytes, loader),
            "supervisor": (plan.supervisor_bytes, supervisor),
            "total": (plan.total_bytes, max(sums)),
        },
    }


def judge(forked: bool, part: str, estimate: int, measured: int) -> str:
    """Empty if the estimate is within its rule (the module's docstring), else BELOW or ABOVE."""
    if estimate < measured:
        return "BELOW"
    if part == "total":
        return "ABOVE" if estimate > TOTAL_HIGH * measured else ""
    slack = FORKED_SLACK_BYTES if forked and part in ("worker", "loader") else 0
    return "ABOVE" if estimate > max(HIGH * measured, measured + slack) else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decodes", type=int, default=4, help="longest segments decoded per worker (default 4)")
    parser.add_argument(
        "--model", type=Path, action="append", default=[], metavar="DIR",
        help="also measure this paraformer model directory, e.g. a real release (its text is not checked)",
    )  # fmt: skip
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(
        f"each worker decoded a {sum(LONGEST_SEG):g} s segment {args.decodes} times (seg {LONGEST_SEG[0]:g}/"
        f"{LONGEST_SEG[1]:g}); plan uses LONGEST_SEGMENT_S = {LONGEST_SEGMENT_S:g}; MiB; worker: RSS if spawned,"
        " USS if forked; loader and supervisor: peak RSS; total: largest sum of PSS in the last round\n"
    )
    print(f"{'model':<10} {'workers':>7} {'threads':>7} {'started':>7} | {'worker: loaded':>14} {'now':>6} {'meas':>6}"
          f" {'est':>6} {'ratio':>5} | {'loader: peak':>12} {'est':>6} {'ratio':>5} | {'supervisor: peak':>16} {'est':>6}"
          f" {'ratio':>5} | {'total: PSS':>10} {'est':>6} {'ratio':>5}")  # fmt: skip
    outside: list[str] = []
    with tempfile.TemporaryDirectory(prefix="capsd-memory-") as tmp:
        own = models(Path(tmp))
        for name, model_dir in {**own, **{d.name: d for d in args.model}}.items():
            for count, threads, preload in ROWS:
                run = Path(tmp) / f"{name}-{count}-{threads}-{preload}"
                run.mkdir()
                m = measure(run, model_dir, count, threads, args.decodes, exact=name in own, preload=preload)
                started = "fork" if m["forked"] else "spawn"
                verdicts = [judge(m["forked"], part, *figures) for part, figures in m["parts"].items()]
                outside += [f"{name} {count}x{threads} {started} {v}" for v in sorted(set(verdicts) - {""})]
                cells = " | ".join(cell(m["parts"][part], width) for part, width in PARTS.items())
                print(f"{name[:10]:<10} {count:>7} {threads:>7} {started:>7} | {m['loaded'] / MIB:>14.1f}"
                      f" {m['now'] / MIB:>6.1f} {cells}", flush=True)  # fmt: skip
    print(
        f"\nnever below measured; spawned at most {HIGH}x (worker, supervisor); forked at most {HIGH}x or"
        f" {FORKED_SLACK_BYTES // MIB} MiB above (worker, loader), {HIGH}x (supervisor); total at most {TOTAL_HIGH}x: "
        + (", ".join(outside) if outside else "met in every row")
    )


def cell(figures: tuple[int, int], width: int) -> str:
    estimate, measured = figures
    if not estimate:
        return f"{'-':>{width}} {'-':>6} {'-':>5}"
    return f"{measured / MIB:>{width}.1f} {estimate / MIB:>6.1f} {estimate / measured:>5.2f}"


if __name__ == "__main__":
    main()
