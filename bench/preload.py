#!/usr/bin/env python3
"""Workers forked from a loader against spawned ones, with a model of real weight (measured side
by side in one run; docs/design.md#workers-forked-from-a-loader).

The model: the self-test paraformer with --weights-mb MiB of weights in its file (default 200;
`python -m capsd.selftest.build --weights-mb N DIR`), built into a temporary directory, so a
worker that loads it holds about that much more.

(a) Sharing: a capsd with N = 1, 2 and 4 workers forked from a loader ([workers] preload = true)
    and one with them spawned (preload = false), one capsd at a time (PSS divides a page among all
    the processes that map it, another capsd's included). Once it is ready, every slot answers a
    dictation exactly; then the PSS of all of capsd's children that hold the model, the loader and
    the workers, is divided by one worker's RSS when it loads the model alone: the spawned worker
    with N = 1. Summed PSS counts each page once however many processes share it. Target: forked
    N = 4 at most 2x (spawned, about 4x).
(b) Healing: a capsd with 1 worker forked and one with 1 worker spawned, both running; the slot's
    worker SIGKILLed, and once capsd has seen it die (the slot's pid in status changed), a
    dictation routed to that slot (tests/support/checks.py: unpaced, exact); measured from the kill
    until it is answered, then the slot must be ready with a new pid. The sides alternate,
    --repeat kills each; the medians are compared. Target: forked at most 0.3x spawned.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from bench.common import machine, start_capsd
from capsd.selftest.build import build_paraformer
from tests.support.checks import dictate, task_ids, wait_for
from tests.support.daemon import Capsd

MIB = 2**20
COUNTS = (1, 2, 4)
SHARING_TARGET = 2.0  # forked N = 4: PSS of the loader and workers / one worker alone
HEALING_TARGET = 0.3  # forked / spawned, time for a killed slot to serve again
POLL_S = 0.005


def side(preload: bool) -> str:
    return "fork" if preload else "spawn"


def model_holders(capsd: Capsd) -> dict[str, list[int]]:
    status = capsd.status()
    return {
        "loaders": [loader["pid"] for loader in status["loaders"]],
        "workers": [slot["pid"] for slot in status["slots"]],
    }


def answer_on_every_slot(capsd: Capsd, count: int, prefix: str) -> None:
    async def every_slot() -> None:
        await asyncio.gather(*(dictate(capsd.url, task_id) for task_id in task_ids(count, prefix)))

    asyncio.run(every_slot())


def sharing(tmp: Path, model_dir: Path, count: int, preload: bool) -> dict[str, int]:
    """(a): one row, in bytes: the loader's PSS, the workers' PSS, their largest USS and RSS."""
    capsd, _ = start_capsd(tmp, model_dir, count, 1, preload=preload)
    try:
        answer_on_every_slot(capsd, count, f"share-{side(preload)}-{count}")
        holders = model_holders(capsd)
        if {s["started"] for s in capsd.status()["slots"]} != {side(preload)}:
            raise SystemExit(f"workers not {side(preload)}ed: {capsd.status()['slots']}")
        info = {pid: psutil.Process(pid).memory_full_info() for pids in holders.values() for pid in pids}
        workers = [info[pid] for pid in holders["workers"]]
        return {
            "loader": sum(info[pid].pss for pid in holders["loaders"]),
            "workers": sum(w.pss for w in workers),
            "uss": max(w.uss for w in workers),
            "rss": max(w.rss for w in workers),
        }
    finally:
        capsd.stop()


def heal(capsd: Capsd, n: int, preload: bool) -> float:
    """(b): seconds from SIGKILL of slot 0's worker until a dictation routed to it is answered."""
    old = capsd.worker_pid(0)
    start = time.perf_counter()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: capsd.worker_pid(0) != old, 30, "capsd to see the kill", every=POLL_S)
    asyncio.run(dictate(capsd.url, task_ids(1, f"heal-{side(preload)}-{n}")[0]))
    elapsed = time.perf_counter() - start
    slot = capsd.status()["slots"][0]
    if slot["state"] != "ready" or slot["pid"] in (None, old) or slot["started"] != side(preload):
        raise SystemExit(f"slot 0 not ready with a new {side(preload)}ed worker: {slot}")
    return elapsed


def healing(tmp: Path, model_dir: Path, repeat: int) -> dict[bool, list[float]]:
    daemons = {preload: start_capsd(tmp, model_dir, 1, 1, preload=preload)[0] for preload in (True, False)}
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for n in range(repeat):
            for preload, capsd in daemons.items():
                times[preload].append(heal(capsd, n, preload))
    finally:
        for capsd in daemons.values():
            capsd.stop()
    return times


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report_sharing(rows: dict[tuple[int, bool], dict[str, int]], weights_mb: int) -> bool:
    alone = rows[1, False]["rss"]
    print(
        f"(a) sharing, the {weights_mb} MiB model: PSS of capsd's children holding the model (loader + workers),"
        f" after a dictation on every slot, / one worker's RSS alone (spawned, N = 1): {alone / MIB:.1f} MiB; MiB"
    )
    print(f"  {'workers':>7} {'started':>7} | {'loader PSS':>10} {'workers PSS':>11} {'sum':>7} | {'ratio':>5}"
          f" | {'worker USS':>10} {'RSS':>7}")  # fmt: skip
    for (count, preload), row in rows.items():
        total = row["loader"] + row["workers"]
        print(
            f"  {count:>7} {side(preload):>7} | {row['loader'] / MIB:>10.1f} {row['workers'] / MIB:>11.1f}"
            f" {total / MIB:>7.1f} | {total / alone:>5.2f} | {row['uss'] / MIB:>10.1f} {row['rss'] / MIB:>7.1f}"
        )
    four = rows[4, True]
    ratio = (four["loader"] + four["workers"]) / alone
    print(
        f"  forked, 4 workers: {ratio:.2f}x one worker alone   target <= {SHARING_TARGET:g}x   {verdict(ratio <= SHARING_TARGET)}\n"
    )
    return ratio <= SHARING_TARGET


def report_healing(times: dict[bool, list[float]], weights_mb: int) -> bool:
    print(
        f"(b) healing, the {weights_mb} MiB model, 1 worker: SIGKILL of the slot's worker to a dictation routed"
        " to it answered exactly (and the slot ready with a new pid); sides alternating"
    )
    for preload in (True, False):
        listed = " ".join(f"{t:.3f}" for t in times[preload])
        print(f"  {side(preload):<6} median {statistics.median(times[preload]):6.3f} s   runs: {listed}")
    ratio = statistics.median(times[True]) / statistics.median(times[False])
    print(f"  forked / spawned: {ratio:.2f}x   target <= {HEALING_TARGET:g}x   {verdict(ratio <= HEALING_TARGET)}\n")
    return ratio <= HEALING_TARGET


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights-mb", type=int, default=200, help="MiB of weights in the model (default 200)")
    parser.add_argument("--repeat", type=int, default=5, help="kills per side in (b) (default 5)")
    args = parser.parse_args()
    print(f"machine: {machine()}\n")
    with tempfile.TemporaryDirectory(prefix="capsd-preload-") as tmp:
        model_dir = Path(tmp) / "model"
        build_paraformer(model_dir, weights_mib=args.weights_mb)
        rows = {
            (count, preload): sharing(Path(tmp), model_dir, count, preload)
            for count in COUNTS
            for preload in (True, False)
        }
        times = healing(Path(tmp), model_dir, args.repeat)
    shared = report_sharing(rows, args.weights_mb)
    healed = report_healing(times, args.weights_mb)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0 if shared and healed else 1


if __name__ == "__main__":
    raise SystemExit(main())
