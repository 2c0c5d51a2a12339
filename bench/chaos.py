#!/usr/bin/env python3
"""Chaos soak: CapsWriter clients against a real capsd while a killer SIGKILLs its workers.

A real capsd (N workers, restart intensity too high to trip) serves C clients for M minutes.
Each client, on one connection, loops over tasks: random digit strings of 5-90 s as tones, sent
either as CapsWriter's file client does (60 s frames, is_final on the last one, seg 25/2 or
15/2) or as its mic client does (0.1 s frames paced at 1x, 2x, 10x real time or unpaced, seg
15/2, an empty final frame). Meanwhile a killer picks a random slot every 2-8 s, kills its
worker (pid from `status`) with SIGKILL, either at once (idle, loading audio, mid-send) or once
the slot is busy plus a random part of a decode, and waits for the slot to come back.

It checks, and fails the run otherwise:
- every task got exactly one final frame, and nothing after it (a task without one within
  120 s of its last frame sent is a hang);
- every task that did not fail is exact: its tokens are the digits sent, timestamps within
  0.1 s of the true tone starts;
- every failed task has code worker_crashed, and the set of failed tasks the clients saw equals
  both the union of `lost_tasks` over capsd's "worker exited" log lines and the tasks of its
  "task failed" lines; one "worker exited" (reason crashed) per kill, and after each kill the
  slot's `restarts` grew by one and a new pid got ready; status totals match the clients' view;
- the supervisor's RSS after the warm-up (the first minute) and at the end differ by at most
  max(10 MiB, 10 %);
- capsd stops cleanly (exit 0) on SIGTERM.

Use --heavy (a model with a real Paraformer's decode cost) so that kills land mid-decode.
Not part of the test run: `python bench/chaos.py --minutes 10 --heavy`.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import os
import random
import re
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import websockets
from common import machine

from capsd.selftest.build import build_paraformer
from capsd.selftest.client import send_file, send_mic
from capsd.selftest.daemon import Capsd
from capsd.selftest.tones import synth, token_digits

TASK_TIMEOUT_S = 120  # from the task's last frame sent to its final frame
GRACE_S = 3  # after a client's last task, so a late duplicate final frame is still seen
MIC_FRAME_S = 0.1
KILL_EVERY_S = (2, 8)
RSS_BOUND = (10 * 2**20, 0.10)


@dataclass
class Expected:
    source: str
    digits: str
    starts: list[float]


@dataclass
class Run:
    tasks: dict[str, Expected] = field(default_factory=dict)
    frames: dict[Any, list[dict[str, Any]]] = field(default_factory=dict)
    finals: dict[str, asyncio.Event] = field(default_factory=dict)
    kills: list[str] = field(default_factory=list)  # the slot's state at each kill: idle, busy
    problems: list[str] = field(default_factory=list)


async def read(ws: Any, run: Run) -> None:
    try:
        async for raw in ws:
            message = json.loads(raw)
            run.frames.setdefault(message["task_id"], []).append(message)
            if message["is_final"] and message["task_id"] in run.finals:
                run.finals[message["task_id"]].set()
    except websockets.ConnectionClosed as e:
        run.problems.append(f"connection closed by capsd: {e}")


async def client(n: int, url: str, rng: random.Random, deadline: float, run: Run) -> None:
    async with websockets.connect(url, max_size=None) as ws:
        reader = asyncio.create_task(read(ws, run))
        for k in range(10**6):
            if time.monotonic() >= deadline:
                break
            task_id, seconds = f"c{n}-{k}", rng.uniform(5, 90)
            digits = "".join(rng.choices("0123456789", k=int((seconds - 0.2) / 0.5)))
            samples, starts = synth(digits)
            source = rng.choice(["file", "mic"])
            run.tasks[task_id] = Expected(source, digits, starts)
            final = run.finals[task_id] = asyncio.Event()
            if source == "file":
                await send_file(ws, task_id, samples, seg=rng.choice([(25, 2), (15, 2)]))
            else:
                pace = rng.choice([1, 0.5, 0.1, 0]) * MIC_FRAME_S
                await send_mic(ws, task_id, samples, frame_s=MIC_FRAME_S, seg=(15, 2), pace=pace)
            try:
                await asyncio.wait_for(final.wait(), TASK_TIMEOUT_S)
            except asyncio.TimeoutError:  # TimeoutError only from Python 3.11
                pass  # judged at the end: no final frame
        await asyncio.sleep(GRACE_S)
        reader.cancel()


async def killer(capsd: Capsd, workers: int, rng: random.Random, deadline: float, run: Run) -> None:
    while time.monotonic() + KILL_EVERY_S[1] < deadline:
        await asyncio.sleep(rng.uniform(*KILL_EVERY_S))
        slot = rng.randrange(workers)
        before = (await asyncio.to_thread(capsd.status))["slots"][slot]
        if rng.random() < 0.5:  # mid-decode: wait for busy, then a random part of a decode
            for _ in range(100):
                before = (await asyncio.to_thread(capsd.status))["slots"][slot]
                if before["state"] == "busy":
                    await asyncio.sleep(rng.uniform(0, 1.0))
                    break
                await asyncio.sleep(0.05)
        os.kill(before["pid"], signal.SIGKILL)
        run.kills.append("idle" if before["state"] == "ready" else before["state"])
        for _ in range(600):  # the slot comes back: a new pid, ready, one more restart
            after = (await asyncio.to_thread(capsd.status))["slots"][slot]
            if after["pid"] != before["pid"] and after["state"] in ("ready", "busy"):
                break
            await asyncio.sleep(0.1)
        if after["restarts"] != before["restarts"] + 1 or after["pid"] == before["pid"]:
            run.problems.append(
                f"kill {len(run.kills)} of slot {slot}: restarts {before['restarts']} -> "
                f"{after['restarts']}, pid {before['pid']} -> {after['pid']} ({after['state']})"
            )


def rss_sampler(capsd: Capsd, warm_at: float) -> Any:
    async def sample() -> int:
        await asyncio.sleep(max(0.0, warm_at - time.monotonic()))
        return psutil.Process(capsd.proc.pid).memory_info().rss

    return asyncio.create_task(sample())


def judge_tasks(run: Run) -> tuple[set[str], int]:
    """The failed task ids the clients saw, and how many tasks were exact; records problems."""
    failed, exact = set(), 0
    for task_id, want in run.tasks.items():
        frames = run.frames.get(task_id, [])
        finals = [i for i, f in enumerate(frames) if f["is_final"]]
        if not finals:
            run.problems.append(f"{task_id}: no final frame ({want.source}, {len(want.digits)} digits)")
            continue
        if len(finals) > 1 or finals[0] != len(frames) - 1:
            run.problems.append(f"{task_id}: {len(finals)} final frames, {len(frames) - 1 - finals[0]} after the first")
        final = frames[finals[0]]
        if "error" in final:
            failed.add(task_id)
            if final["error"]["code"] != "worker_crashed":
                run.problems.append(f"{task_id}: failed with {final['error']}")
        elif token_digits(final["tokens"]) != want.digits:
            run.problems.append(f"{task_id}: got {token_digits(final['tokens'])!r}, sent {want.digits!r}")
        elif max((abs(a - b) for a, b in zip(final["timestamps"], want.starts)), default=0) >= 0.1:
            run.problems.append(f"{task_id}: timestamps off by >= 0.1 s")
        else:
            exact += 1
    if stray := set(run.frames) - set(run.tasks):
        run.problems.append(f"frames for tasks never sent: {sorted(map(str, stray))}")
    return failed, exact


def parse_logs(text: str) -> tuple[list[tuple[str, str, list[str]]], set[str]]:
    """capsd's console log: (reason, exitcode, lost_tasks) per "worker exited", and every "task failed" task."""
    exits, failed = [], set()
    for line in text.splitlines():
        if "] worker exited " in line:
            fields = dict(re.findall(r"(reason|exitcode)=(\S+)", line))
            lost = re.search(r"lost_tasks=(\[[^\]]*\])", line)
            exits.append(
                (
                    fields.get("reason", "?"),
                    fields.get("exitcode", "?"),
                    ast.literal_eval(lost.group(1)) if lost else [],
                )
            )
        elif "] task failed " in line and (task := re.search(r"\btask=(\S+)", line)):
            failed.add(task.group(1))
    return exits, failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10, help="how long clients start tasks (default 10)")
    parser.add_argument("--workers", type=int, default=2, help="worker slots (default 2)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client connections (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for tasks and kills (default 0)")
    parser.add_argument("--heavy", action="store_true", help="the CPU-heavy self-test model (kills land mid-decode)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="capsd-chaos-"))
    config: dict[str, dict[str, Any]] = {
        "workers": {"count": args.workers, "restart_intensity": 1000, "restart_period_s": 60},
        "log": {"format": "console"},
    }
    if args.heavy:
        build_paraformer(tmp / "heavy", heavy=True)
        config["model"] = {"dir": str(tmp / "heavy")}
    print(f"machine: {machine()}")
    capsd = Capsd(tmp, config)
    run = Run()
    started = time.monotonic()
    deadline = started + args.minutes * 60

    async def soak() -> tuple[int, int]:
        warm = rss_sampler(capsd, started + min(60, args.minutes * 30))
        await asyncio.gather(
            killer(capsd, args.workers, random.Random(f"{args.seed}-killer"), deadline, run),
            *(client(n, capsd.url, random.Random(f"{args.seed}-{n}"), deadline, run) for n in range(args.clients)),
        )
        return await warm, psutil.Process(capsd.proc.pid).memory_info().rss

    try:
        rss_warm, rss_end = asyncio.run(soak())
        duration = time.monotonic() - started
        status = capsd.status()
    finally:
        exitcode = capsd.stop()
    exits, logged_failed = parse_logs(capsd.logs())

    failed, exact = judge_tasks(run)
    lost = {t for _, _, tasks in exits for t in tasks}
    restarts = sum(s["restarts"] for s in status["slots"])
    if failed != lost or failed != logged_failed:
        run.problems.append(
            f"failed tasks: clients saw {sorted(failed)}, logs lost {sorted(lost)}, logs failed {sorted(logged_failed)}"
        )
    if len(exits) != len(run.kills) or restarts != len(run.kills) or any(e[:2] != ("crashed", "-9") for e in exits):
        run.problems.append(f"{len(run.kills)} kills, {restarts} restarts, worker exits logged: {exits}")
    done = sum(s["tasks_done"] for s in status["slots"])
    tasks_failed = sum(s["tasks_failed"] for s in status["slots"])
    if (done, tasks_failed) != (exact, len(failed)):
        run.problems.append(f"status: {done} done, {tasks_failed} failed")
    growth = rss_end - rss_warm
    if growth > max(RSS_BOUND[0], RSS_BOUND[1] * rss_warm):
        run.problems.append(f"supervisor RSS grew by {growth / 2**20:.1f} MiB")
    if exitcode != 0:
        run.problems.append(f"capsd exited {exitcode} on SIGTERM")

    sources = [t.source for t in run.tasks.values()]
    states = {s: run.kills.count(s) for s in sorted(set(run.kills))}
    print(
        f"chaos: {args.minutes:g} min, {args.workers} workers, {args.clients} clients, seed {args.seed},"
        f" {'heavy' if args.heavy else 'self-test'} model"
    )
    print(
        f"tasks: {len(run.tasks)} (file {sources.count('file')}, mic {sources.count('mic')}),"
        f" exact {exact}, failed {len(failed)} (worker_crashed), lost in killed workers per logs {len(lost)}"
    )
    print(f"kills: {len(run.kills)} {states}, restarts {restarts}, worker exits logged {len(exits)}")
    print(
        f"supervisor RSS: {rss_warm / 2**20:.1f} MiB after warm-up, {rss_end / 2**20:.1f} MiB at end"
        f" ({growth / 2**20:+.1f} MiB)"
    )
    print(f"duration: {duration:.0f} s")
    for problem in run.problems:
        print(f"  problem: {problem}")
    if run.problems:
        print(f"capsd log kept: {capsd.log_path}")
        print(f"chaos: FAIL ({len(run.problems)} problems)")
        return 1
    shutil.rmtree(tmp)
    print("chaos: PASS")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
