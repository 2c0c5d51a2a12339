#!/usr/bin/env python3
"""Chaos soak: CapsWriter clients against a real capsd while its workers are SIGKILLed.

A real capsd (N workers, restart intensity too high to trip) serves C clients for M minutes.
Each client loops over tasks on one connection: random digits as tones, 5-90 s, sent as
CapsWriter's file client does (60 s frames, is_final on the last, seg 25/2 or 15/2) or as its
mic client does (0.1 s frames at 1x, 2x, 10x real time or unpaced, seg 15/2, empty final frame).
Every 2-8 s a killer SIGKILLs a random slot's worker (pid from status), at a random moment or
a random part into a decode, and waits for the slot to come back. At the end it checks:
- every task got exactly one final frame, and nothing after it (none within 120 s: a hang);
- every task that did not fail is exact: tokens are the digits sent, timestamps within 0.1 s;
- every failure is worker_crashed, and the failed tasks the clients saw are exactly the union of
  `lost_tasks` in capsd's "worker exited" log lines and the tasks of its "task failed" lines;
  one crash exit per kill, each kill grew the slot's restarts by one; status counts agree;
- workers are stateless, so a kill fails at most the one task whose segment was in the worker:
  each kill's "worker exited" line (found by the killed pid) names at most one task, and the failed
  tasks are as many as the kills that hit a segment. A kill of a worker status showed idle just
  before may still hit one: a job can be handed over between the status read and the kill (or
  the end-of-file that tells capsd). Such kills are counted and shown, not failed;
- the supervisor's RSS grew by at most max(10 MiB, 10 %) from the warm-up (first minute) to the
  end, its open files and threads by at most 10; capsd exits 0 on SIGTERM.
Not part of the test run; --heavy (a real Paraformer's decode cost) makes kills land mid-decode:
`python bench/chaos.py --minutes 10 --heavy`.

--pool changes the pool instead of killing workers (docs/design.md#changing-the-pool): every
3-10 s `capsctl scale` to 1-3 slots, `capsctl restart-worker all`, or a model flip by SIGHUP
between the self-test model and the heavy one. Then no task may fail at all, no worker may exit
unasked, every change must succeed, and the tasks done (capsd_tasks_total, which outlives the
slots that go) must be the exact ones.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import psutil
import websockets
from common import conclude, machine

from capsd.protocol import clip
from capsd.selftest.build import build_paraformer
from capsd.selftest.tones import synth, token_digits
from tests.support.checks import http_get
from tests.support.client import connect, send_file, send_mic
from tests.support.daemon import Capsd

TASK_TIMEOUT_S = 120  # from the task's last frame sent to its final frame
GRACE_S = 3  # after a client's last task, so a late duplicate final frame is still seen
MIC_FRAME_S = 0.1
KILL_EVERY_S = (2, 8)
CHANGE_EVERY_S = (3, 10)
RSS_BOUND = (10 * 2**20, 0.10)
HANDLES_BOUND = 10  # open files, threads


@dataclass
class Expected:
    source: str
    digits: str
    starts: list[float]


@dataclass(frozen=True)
class Kill:
    slot: int
    pid: int
    state: str  # the slot's state in status just before the kill: idle, busy


class WorkerExit(NamedTuple):
    """A "worker exited" line of capsd's log."""

    pid: int | None
    reason: str
    exitcode: str
    lost: list[str]  # the task whose segment was in the worker, clipped as logs clip it


@dataclass
class Run:
    tasks: dict[str, Expected] = field(default_factory=dict)
    frames: dict[Any, list[dict[str, Any]]] = field(default_factory=dict)
    finals: dict[str, asyncio.Event] = field(default_factory=dict)
    kills: list[Kill] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
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
    async with connect(url) as ws:
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
        run.kills.append(Kill(slot, before["pid"], "idle" if before["state"] == "ready" else before["state"]))
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


async def changer(capsd: Capsd, heavy: Path, rng: random.Random, deadline: float, run: Run) -> None:
    """--pool: a change of the pool every 3-10 s, each waited for before the next."""
    config, flips = capsd.config_path.read_text(), 0
    while time.monotonic() + CHANGE_EVERY_S[1] + 30 < deadline:
        await asyncio.sleep(rng.uniform(*CHANGE_EVERY_S))
        change = rng.choice(["scale", "scale", "restart", "model"])
        if change == "model":
            flips += 1
            model = heavy if flips % 2 else ""
            capsd.config_path.write_text(config + f'[model]\ndir = "{model}"\n')
            capsd.proc.send_signal(signal.SIGHUP)
            for _ in range(1200):
                if capsd.logs().count("] model changed ") == flips:
                    break
                await asyncio.sleep(0.1)
            else:
                run.problems.append(f"model change {flips} to {model or 'self-test'}: not done in 120 s")
            run.changes.append("model")
            continue
        args = ["scale", str(rng.randint(1, 3))] if change == "scale" else ["restart-worker", "all"]
        ctl = [sys.executable, "-m", "capsd.ctl", "--socket", str(capsd.socket), *args]
        done = await asyncio.to_thread(subprocess.run, ctl, capture_output=True, text=True)
        if done.returncode:
            run.problems.append(f"capsctl {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
        run.changes.append(" ".join(args))


def tasks_done(capsd: Capsd) -> int:
    """capsd_tasks_total{outcome="done"}: counted in the registry, not in the slots that go."""
    lines = http_get(capsd.port, "/metrics")[1].splitlines()
    return sum(int(float(line.split()[-1])) for line in lines
               if line.startswith("capsd_tasks_total{") and 'outcome="done"' in line)  # fmt: skip


def usage(pid: int) -> tuple[int, int, int]:
    """RSS, open files and threads of a process."""
    process = psutil.Process(pid)
    return process.memory_info().rss, process.num_fds(), process.num_threads()


async def usage_at(pid: int, at: float) -> tuple[int, int, int]:
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    return usage(pid)


def judge_tasks(run: Run) -> tuple[dict[str, str], int]:
    """The failed tasks the clients saw (id -> code), and how many tasks were exact; records problems."""
    failed, exact = {}, 0
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
            failed[task_id] = final["error"]["code"]
            if failed[task_id] != "worker_crashed":
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


def parse_logs(text: str) -> tuple[list[WorkerExit], set[str]]:
    """capsd's console log: every "worker exited" line, and every "task failed" task."""
    exits, failed = [], set()
    for line in text.splitlines():
        if "] worker exited " in line:
            fields = dict(re.findall(r"\b(reason|exitcode|pid)=(\S+)", line))
            lost = ast.literal_eval(m.group(1)) if (m := re.search(r"lost_tasks=(\[[^\]]*\])", line)) else []
            pid = int(fields["pid"]) if fields.get("pid", "").isdigit() else None
            exits.append(WorkerExit(pid, fields.get("reason", "?"), fields.get("exitcode", "?"), lost))
        elif "] task failed " in line and (m := re.search(r"\btask=('[^']*'|\S+)", line)):
            failed.add(m.group(1).strip("'"))  # the renderer quotes a value only if it has spaces
    return exits, failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10, help="how long clients start tasks (default 10)")
    parser.add_argument("--workers", type=int, default=2, help="worker slots (default 2)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client connections (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for tasks and kills (default 0)")
    parser.add_argument("--heavy", action="store_true", help="the CPU-heavy self-test model (kills land mid-decode)")
    parser.add_argument("--pool", action="store_true", help="change the pool (scale, roll, model) instead of killing")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="capsd-chaos-"))
    config: dict[str, dict[str, Any]] = {
        "workers": {"count": args.workers, "restart_intensity": 1000, "restart_period_s": 60},
        "log": {"format": "console"},
    }
    if args.heavy or args.pool:
        build_paraformer(tmp / "heavy", heavy=True)
    if args.heavy and not args.pool:  # --pool starts on the self-test model and flips
        config["model"] = {"dir": str(tmp / "heavy")}
    print(f"machine: {machine()}")
    capsd, run = Capsd(tmp, config), Run()
    started = time.monotonic()
    deadline = started + args.minutes * 60

    async def soak() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        warm = asyncio.create_task(usage_at(capsd.proc.pid, started + min(60, args.minutes * 30)))
        chaos = random.Random(f"{args.seed}-killer")
        disorder = changer(capsd, tmp / "heavy", chaos, deadline, run) if args.pool else None
        await asyncio.gather(
            disorder or killer(capsd, args.workers, chaos, deadline, run),
            *(client(n, capsd.url, random.Random(f"{args.seed}-{n}"), deadline, run) for n in range(args.clients)),
        )
        return await warm, usage(capsd.proc.pid)

    try:
        (rss0, fds0, threads0), (rss1, fds1, threads1) = asyncio.run(soak())
        duration = time.monotonic() - started
        slots = capsd.status()["slots"]
        done_total = tasks_done(capsd)
    finally:
        exitcode = capsd.stop()

    failed, exact = judge_tasks(run)
    exits, logged_failed = parse_logs(capsd.logs())
    failed_clipped = {clip(task_id) for task_id in failed}  # as the logs name them
    lost = {t for e in exits for t in e.lost}
    exit_of = {e.pid: e for e in exits}
    per_kill = [(kill, exit_of.get(kill.pid)) for kill in run.kills]
    idle = [(k, e) for k, e in per_kill if k.state == "idle"]
    busy = [(k, e) for k, e in per_kill if k.state != "idle"]
    hits = [e for _, e in per_kill if e and e.lost]
    idle_lost = [f"slot {k.slot} pid {k.pid} lost {e.lost}" for k, e in idle if e and e.lost]
    unlogged = [f"slot {k.slot} pid {k.pid}" for k in run.kills if k.pid not in exit_of]
    restarts, done, tasks_failed = (sum(s[k] for s in slots) for k in ("restarts", "tasks_done", "tasks_failed"))
    pool_checks = {
        f"failed tasks: {failed}": not failed,
        f"worker exits not asked for: {[e for e in exits if e.reason != 'requested']}":
            all(e.reason == "requested" for e in exits),
        f"capsd_tasks_total done {done_total}, exact {exact}": done_total == exact,
    }  # fmt: skip
    kill_checks = {
        f"failed tasks: clients {sorted(failed)}, logs lost {sorted(lost)}, logs failed {sorted(logged_failed)}":
            failed_clipped == lost == logged_failed,
        f"{len(run.kills)} kills, {restarts} restarts, worker exits logged {exits}":
            len(exits) == restarts == len(run.kills) and all((e.reason, e.exitcode) == ("crashed", "-9") for e in exits),
        f"kills without a worker exited line for their pid: {unlogged}": not unlogged,
        f"worker exits that lost more than one task: {[e for e in exits if len(e.lost) > 1]}":
            all(len(e.lost) <= 1 for e in exits),
        f"{len(failed)} failed tasks, {len(hits)} kills that hit a segment": len(failed) == len(hits),
        f"status counts {done} done, {tasks_failed} failed": (done, tasks_failed) == (exact, len(failed)),
    }  # fmt: skip
    checks = {
        **(pool_checks if args.pool else kill_checks),
        f"supervisor RSS grew by {(rss1 - rss0) / 2**20:.1f} MiB": rss1 - rss0 <= max(RSS_BOUND[0], RSS_BOUND[1] * rss0),
        f"supervisor open files {fds0} -> {fds1}, threads {threads0} -> {threads1}":
            fds1 - fds0 <= HANDLES_BOUND and threads1 - threads0 <= HANDLES_BOUND,
        f"capsd exited {exitcode} on SIGTERM": exitcode == 0,
    }  # fmt: skip
    run.problems += [problem for problem, ok in checks.items() if not ok]

    sources = Counter(t.source for t in run.tasks.values())
    model = "self-test and heavy models in turn" if args.pool else f"{'heavy' if args.heavy else 'self-test'} model"
    print(
        f"chaos: {args.minutes:g} min, {args.workers} workers, {args.clients} clients, seed {args.seed},"
        f" {model}, {duration:.0f} s in all"
    )
    print(
        f"tasks: {len(run.tasks)} ({dict(sources)}), exact {exact}, failed {len(failed)}"
        f" {dict(Counter(failed.values()))}, lost in killed workers per the logs {len(lost)}"
    )
    print(
        f"supervisor: RSS {rss0 / 2**20:.1f} MiB after warm-up, {rss1 / 2**20:.1f} MiB at end"
        f" ({(rss1 - rss0) / 2**20:+.1f} MiB); open files {fds0} -> {fds1}, threads {threads0} -> {threads1}"
    )
    if args.pool:
        print(f"pool changes: {len(run.changes)} {dict(Counter(run.changes))}; worker exits logged {len(exits)},"
              f" all requested; slots at the end {len(slots)}")  # fmt: skip
        return conclude("chaos --pool", run.problems, capsd.log_path, tmp)
    print(
        f"kills: {len(run.kills)} {dict(Counter(k.state for k in run.kills))}, restarts {restarts},"
        f" worker exits logged {len(exits)}"
    )
    idle_failed, busy_failed = (
        len({t for _, e in kills if e for t in e.lost} & failed_clipped) for kills in (idle, busy)
    )
    print(
        f"tasks failed per kill: idle worker {idle_failed} in {len(idle)} kills ({idle_failed / max(1, len(idle)):.2f}"
        f" per kill); mid-decode {busy_failed} in {len(busy)} kills ({busy_failed / max(1, len(busy)):.2f} per kill),"
        f" {len(hits)} kills hit a segment"
    )
    if idle_lost:
        print(f"  idle in status just before the kill, a job handed over meanwhile: {idle_lost}")
    return conclude("chaos", run.problems, capsd.log_path, tmp)


if __name__ == "__main__":
    raise SystemExit(main())
