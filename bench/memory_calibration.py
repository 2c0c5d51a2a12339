#!/usr/bin/env python3
"""Memory plan against measured RSS: calibrates the constants in capsd/memory.py.

For the self-test model and the CPU-heavy one, a real capsd with 1, 2 and 3 workers (and 1
worker with 2 threads) is sent, on every slot at once, a task cut into one segment of the
longest length the contract allows: seg_duration 60, seg_overlap 59.99, so 119.99 s, against
LONGEST_SEGMENT_S = 120 in the plan (onnxruntime's arena keeps the peak of the longest input,
docs/design.md#the-arena-keeps-its-peak). This is repeated --decodes times, since a worker's RSS may still creep
up over the first few long decodes.

Before the last round, the workers are stopped while clients send never-final tasks of the
longest frames capsd admits ([server] max_message_bytes, 16 MiB: 196 s of audio; segments of
25 + 2 s), on more
connections than the intake's budget holds (docs/design.md#intake), until it is full; then the
workers go on and the round is decoded while those clients keep sending: the supervisor is
planned for all the intake admits, however fast the model drains it.

Measured is the peak RSS (VmHWM) of every process, which is what an OOM kill or a cgroup limit
meets: each worker's, and the supervisor's (the daemon's process plus multiprocessing's resource
tracker). "loaded" is a worker's RSS when ready, before any decode, and "now" after the last.
The estimate is capsd's own plan for that config (capsd.preflight.check). Printed: estimate vs
measured per worker (the largest), for the supervisor and in total, and the ratio estimate /
measured, which must stay in 1.0..1.3. The total adds peaks that need not coincide and counts
shared library pages in every process: an upper bound of what the cgroup is charged.
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

from bench.common import check_exact, machine, models, rss, tone_file, transcribe
from capsd.protocol import LONGEST_SEGMENT_S
from tests.support.checks import task_ids, wait_for
from tests.support.client import connect, file_frames, frame
from tests.support.daemon import Capsd

MIB = 2**20
LONGEST_SEG = (60.0, 59.99)  # seg_duration <= 60, seg_overlap < seg_duration (docs/design.md#the-protocol)
LOW, HIGH = 1.0, 1.3
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


def measure(tmp: Path, model_dir: Path, count: int, threads: int, decodes: int, exact: bool) -> dict[str, Any]:
    """Start capsd, decode the longest segment `decodes` times on every slot, read RSS and the plan."""
    seconds = sum(LONGEST_SEG)
    capsd = Capsd(tmp, {"workers": {"count": count, "threads": threads}, "model": {"dir": str(model_dir)}})
    try:
        loaded = max(rss(capsd)[1])
        for n in range(decodes):
            tasks = {}
            for slot, task_id in enumerate(task_ids(count)):
                samples, digits = tone_file(seconds, seed=100 * n + slot)
                tasks[task_id] = (file_frames(task_id, samples, seg=LONGEST_SEG), digits)
            with flooded(capsd, count) if n == decodes - 1 else contextlib.nullcontext():
                _, finals = transcribe(capsd.url, {t: frames for t, (frames, _) in tasks.items()})
            for task_id, (_, digits) in tasks.items():
                if exact:
                    check_exact(finals[task_id], digits)
        now = max(rss(capsd)[1])
        supervisor, workers = rss(capsd, peak=True)
        planned = capsd.status()["memory"]["planned_bytes"]
    finally:
        capsd.stop()
    plan = capsd.plan()
    assert plan.total_bytes == planned, "the bench's plan differs from the daemon's"
    return {
        "loaded": loaded,
        "now": now,
        "parts": {  # estimate, measured
            "worker": (plan.worker_bytes, max(workers)),
            "supervisor": (plan.supervisor_bytes, supervisor),
            "total": (plan.total_bytes, sum(workers) + supervisor),
        },
    }


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
        f"{LONGEST_SEG[1]:g}); plan uses LONGEST_SEGMENT_S = {LONGEST_SEGMENT_S:g}; RSS in MiB\n"
    )
    print(f"{'model':<10} {'workers':>7} {'threads':>7} | {'worker: loaded':>14} {'now':>6} {'peak':>6} {'est':>6} {'ratio':>5}"
          f" | {'supervisor: peak':>16} {'est':>6} {'ratio':>5} | {'total: peak':>11} {'est':>6} {'ratio':>5}")  # fmt: skip
    below: list[str] = []
    above: list[str] = []
    with tempfile.TemporaryDirectory(prefix="capsd-memory-") as tmp:
        own = models(Path(tmp))
        for name, model_dir in {**own, **{d.name: d for d in args.model}}.items():
            for count, threads in ((1, 1), (2, 1), (3, 1), (1, 2)):
                run = Path(tmp) / f"{name}-{count}-{threads}"
                run.mkdir()
                m = measure(run, model_dir, count, threads, args.decodes, exact=name in own)
                ratios = {part: est / measured for part, (est, measured) in m["parts"].items()}
                row = f"{name} {count}x{threads}"
                below += [row] if min(ratios.values()) < LOW else []
                above += [row] if max(ratios.values()) > HIGH else []
                cells = " | ".join(
                    f"{m['parts'][part][1] / MIB:>{width}.1f} {m['parts'][part][0] / MIB:>6.1f} {ratios[part]:>5.2f}"
                    for part, width in (("worker", 6), ("supervisor", 16), ("total", 11))
                )
                print(
                    f"{name[:10]:<10} {count:>7} {threads:>7} | {m['loaded'] / MIB:>14.1f} {m['now'] / MIB:>6.1f} {cells}",
                    flush=True,
                )
    print(
        f"\nnever below measured ({LOW}x) per worker, supervisor and total: "
        + (", ".join(below) + " BELOW" if below else "met in every row")
    )
    print(f"at most {HIGH}x measured: " + (", ".join(above) + " ABOVE" if above else "met in every row"))


if __name__ == "__main__":
    main()
