#!/usr/bin/env python3
"""Chaos soak: CapsWriter clients against a real capsd while its workers are SIGKILLed and capsd is stopped.

A real capsd (N workers, restart intensity too high to trip) serves C clients for M minutes.
Each client loops over tasks on one connection: random digits as tones, 5-90 s, sent as
CapsWriter's file client does (60 s frames, is_final on the last, seg 25/2 or 15/2) or as its
mic client does (0.1 s frames at 1x, 2x, 10x real time or unpaced, seg 15/2, empty final frame);
when capsd closes the connection at a stop, it connects again until the next capsd answers.
Every 2-8 s one of the kinds of kill chosen with --kills (all by default):
- random: a random slot's worker (pid from status) SIGKILLed at a random moment or a random part
  into a decode;
- send: a random slot's worker SIGSTOPped with no job in hand (an idle one at once; a busy one is
  stepped, SIGCONT for 5 ms and SIGSTOP again, until its job is done, as under load the next job
  follows at once); once status shows its slot busy (a job on its way to a worker that does not
  read: a segment is far more than a pipe holds, so capsd's send blocks) and, if it comes within
  3 s, more work queued behind, the worker is SIGKILLed (a stopped process dies). Whether a thread
  of capsd was blocked writing to a socket at that moment is shown ("mid-send"; else the job was
  "written" whole). If the job in hand did not end in 10 s of steps, or no job came in 10 s, the
  worker is let go (SIGCONT): a miss, counted and shown;
- stop: in the soak's first half, once a capsd has served 30-90 s, SIGTERM with tasks in progress
  (a busy worker waited for, up to 10 s), then a worker status shows busy inside the grace period
  ([server] stop_timeout_s, 20 s) SIGKILLed; capsd must exit 0 within stop_timeout_s + 10 s, its
  log without a critical line ("slot dispatcher failed"); then a fresh capsd on the same config
  and port serves on. A stop kill is counted as landed if capsd logged the worker's exit (so it
  came before the grace period ended), else as missed.
After each random or send kill the soak waits for the slot to come back. At the end it checks:
- every task a client opened (sent a frame of) got exactly one final frame, and nothing after it
  (none within 120 s: a hang; none before capsd closed the connection at a stop: a task lost);
- every task that did not fail is exact: tokens are the digits sent, timestamps within 0.1 s;
- every failure is worker_crashed, or shutting_down when stops are on, and the failed tasks the
  clients saw are exactly those of the "task failed" and "task refused" lines of every capsd's
  log, the worker_crashed ones exactly the union of `lost_tasks` in the "worker exited" lines;
  one crash exit (-9) per landed kill and no other, each random or send kill grew its slot's
  restarts by one; the last capsd's status counts agree;
- workers are stateless, so a kill fails at most the one task whose segment was in the worker:
  each kill's "worker exited" line (found by the killed pid) names at most one task, and the failed
  tasks are as many as the kills that hit a segment. A kill of a worker status showed idle just
  before may still hit one: a job can be handed over between the status read and the kill (or
  the end-of-file that tells capsd). Such kills are counted and shown, not failed;
- each kind of kill asked for landed at least once (else the soak proved nothing about it);
- the supervisor's RSS grew by at most max(10 MiB, 10 %) from its warm-up (a minute after it
  started, or half the soak if shorter) to the end, its open files and threads by at most 10:
  measured in the last capsd, which serves the soak's second half alone (with no stops, the whole
  soak); every capsd exited 0 on SIGTERM.
Not part of the test run; --heavy (a real Paraformer's decode cost) makes kills land mid-decode
and stops find busy workers: `python -m bench.chaos --minutes 10 --heavy`.

--retry runs capsd with `[workers] retry_lost_jobs = 1`: a job whose worker died runs once more
on another slot, so no kill may fail a task any more: every task exact, except shutting_down at
a stop (a job lost in the grace period is retried but may not finish in it) and a task whose job
two of the soak's kills hit in turn (a poison job by the rules: its task fails worker_crashed,
logged as a poison job); the "worker exited" lines still name the task of each lost job.
restart_period_s is 3 s then: retries pause while 3 jobs were lost within it (the pause has its
tests), and the soak's kills come at least 2.5 s apart.

--pool changes the pool instead of killing workers (docs/design.md#changing-the-pool): every
3-10 s `capsctl scale` to 1-3 slots, `capsctl restart-worker all`, or a model flip by SIGHUP
between the self-test model and the heavy one. Then no task may fail at all, no worker may exit
unasked, every change must succeed, and the tasks done (capsd_tasks_total, which outlives the
slots that go) must be the exact ones.

Workers are forked from a loader (docs/design.md#workers-forked-from-a-loader), capsd's default;
--spawn runs the same soak with `[workers] preload = false`. Either way every worker at the end
must have started as asked; forked, each capsd must have started a loader, and each model flip of
--pool must have started the new model's loader and stopped the old one; spawned, no loader may
start.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import psutil
import websockets

from bench.common import MIC_FRAME_S, conclude, machine
from capsd.ctl import CtlError
from capsd.protocol import clip
from capsd.selftest.build import build_paraformer
from capsd.selftest.tones import synth, token_digits
from tests.support.checks import task_outcomes
from tests.support.client import connect, send_file, send_mic
from tests.support.daemon import Capsd

TASK_TIMEOUT_S = 120  # from the task's last frame sent to its final frame
GRACE_S = 3  # after a client's last task, so a late duplicate final frame is still seen
RECONNECT_S = 0.2  # while capsd stops and the next one starts
POLL_S = 0.02  # status, while waiting for a slot's state
KILL_EVERY_S = (2, 8)
STOP_EVERY_S = (30, 90)  # a capsd's life, from its start to the soak's SIGTERM, in the soak's first half
STOP_TIMEOUT_S = 20  # [server] stop_timeout_s (capsd's default, written out: the bound depends on it)
STOP_SLACK_S = 10  # a stop takes at most stop_timeout_s plus this
STEP_S = 0.005  # a busy worker stepped out of its job runs this long between SIGSTOPs
STEP_LIMIT_S = 10  # ... for at most this long; a stopped worker is hung after heartbeat_timeout_s (30)
JOB_WAIT_S = 10  # a stopped idle worker waits this long for a job, then is let go
QUEUED_WAIT_S = 3  # ... and this long for more work queued behind it
CHANGE_EVERY_S = (3, 10)
RSS_BOUND = (10 * 2**20, 0.10)
HANDLES_BOUND = 10  # open files, threads
KINDS = ("random", "send", "stop")
WRITE_SYSCALL = {"x86_64": 1, "aarch64": 64}.get(platform.machine())  # write(2), as /proc/*/syscall shows it

Usage = tuple[int, int, int]  # RSS, open files, threads


@dataclass
class Expected:
    source: str
    digits: str
    starts: list[float]
    life: int  # the capsd it was sent to
    frames_sent: int = 0


@dataclass(frozen=True)
class Kill:
    kind: str  # random, send, stop
    life: int
    slot: int
    pid: int
    state: str  # the slot's state in status just before the kill: idle, busy
    note: str = ""  # send: mid-send or written, and whether work was queued behind


@dataclass
class Life:
    """One capsd process: a stop ends it, and the next starts on the same config and port."""

    capsd: Capsd
    started: float = field(default_factory=time.monotonic)
    slots: list[dict[str, Any]] = field(default_factory=list)  # status just before its stop
    exitcode: int | None = None
    stop_s: float = 0.0  # from SIGTERM to its exit


class WorkerExit(NamedTuple):
    """A "worker exited" line of capsd's log."""

    pid: int | None
    reason: str
    exitcode: str
    lost: list[str]  # the task whose segment was in the worker, clipped as logs clip it


class Log(NamedTuple):
    """What the soak reads in one capsd's log."""

    exits: list[WorkerExit]
    failed: set[str]  # tasks of "task failed" and "task refused" lines
    poison: set[str]  # tasks of "poison job" lines (--retry)
    retried: int  # "job retried" lines (--retry)
    paused: int  # "lost jobs not retried" lines (--retry: retries paused)
    critical: list[str]  # critical lines, "slot dispatcher failed" among them


@dataclass
class Run:
    start_capsd: Callable[[], Capsd]
    warm_s: float
    kinds: list[str]  # of kill asked for
    warm: tuple[Life, Usage] | None = None  # the last capsd's supervisor after its warm-up
    end: Usage | None = None  # ... after the clients' last task
    end_s: float = 0.0  # time.monotonic() then
    lives: list[Life] = field(default_factory=list)
    stopping: bool = False  # from the soak's SIGTERM until the next capsd is ready
    tasks: dict[str, Expected] = field(default_factory=dict)
    frames: dict[Any, list[dict[str, Any]]] = field(default_factory=dict)
    finals: dict[str, asyncio.Event] = field(default_factory=dict)
    kills: list[Kill] = field(default_factory=list)
    missed: Counter[str] = field(default_factory=Counter)  # "kind: why" of kills whose window was missed
    changes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def capsd(self) -> Capsd:
        return self.lives[-1].capsd


class Counting:
    """A client connection that counts the frames sent on it (send_file and send_mic take any)."""

    def __init__(self, ws: Any, expected: Expected) -> None:
        self.ws, self.expected = ws, expected

    async def send(self, message: str) -> None:
        await self.ws.send(message)
        self.expected.frames_sent += 1


async def read(ws: Any, run: Run) -> None:
    with contextlib.suppress(websockets.ConnectionClosed):
        async for raw in ws:
            message = json.loads(raw)
            run.frames.setdefault(message["task_id"], []).append(message)
            if message["is_final"] and message["task_id"] in run.finals:
                run.finals[message["task_id"]].set()
    if not (run.stopping and ws.close_code == 1001):
        run.problems.append(f"connection closed by capsd, not at a stop: {ws.close_code} {ws.close_reason}")


async def client(n: int, rng: random.Random, deadline: float, run: Run) -> None:
    """Tasks one after another on one connection; after a stop, on a new one to the next capsd."""
    k = 0
    while time.monotonic() < deadline:
        try:
            async with connect(run.capsd.url) as ws:
                life, reader = len(run.lives) - 1, asyncio.create_task(read(ws, run))
                while time.monotonic() < deadline and not reader.done():
                    k += 1
                    if await one_task(ws, f"c{n}-{k}", life, reader, rng, run) == "shutting_down":
                        # As a user would: no new task until capsd has closed the connection.
                        await asyncio.wait({reader}, timeout=STOP_TIMEOUT_S + STOP_SLACK_S)
                if not reader.done():
                    await asyncio.sleep(GRACE_S)
                    reader.cancel()
        except (OSError, websockets.InvalidHandshake, websockets.ConnectionClosed):
            await asyncio.sleep(RECONNECT_S)  # capsd stopping, or the next one starting


async def one_task(
    ws: Any, task_id: str, life: int, reader: asyncio.Task[None], rng: random.Random, run: Run
) -> str | None:
    """One task sent and its final frame waited for; the final frame's error code, if any."""
    seconds = rng.uniform(5, 90)
    digits = "".join(rng.choices("0123456789", k=int((seconds - 0.2) / 0.5)))
    samples, starts = synth(digits)
    source = rng.choice(["file", "mic"])
    expected = run.tasks[task_id] = Expected(source, digits, starts, life)
    final = run.finals[task_id] = asyncio.Event()
    sender = Counting(ws, expected)
    try:
        if source == "file":
            await send_file(sender, task_id, samples, seg=rng.choice([(25, 2), (15, 2)]))
        else:
            pace = rng.choice([1, 0.5, 0.1, 0]) * MIC_FRAME_S
            await send_mic(sender, task_id, samples, frame_s=MIC_FRAME_S, seg=(15, 2), pace=pace)
    finally:
        if not expected.frames_sent:  # closed before its first frame: never opened
            del run.tasks[task_id]
    waiting = asyncio.create_task(final.wait())
    await asyncio.wait({waiting, reader}, timeout=TASK_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()  # no final frame in time, or the connection closed without it: judged at the end
    final_frame = run.frames.get(task_id, [{}])[-1]
    return final_frame["error"]["code"] if "error" in final_frame else None


async def poll(capsd: Capsd, condition: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any] | None:
    """capsd's status once `condition` holds, or None after `timeout` or when capsd no longer answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = await asyncio.to_thread(capsd.status)
        except (OSError, CtlError):
            return None
        if condition(status):
            return status
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(POLL_S)


def state_is(slot: int, state: str) -> Callable[[dict[str, Any]], bool]:
    return lambda status: status["slots"][slot]["state"] == state


async def slot_back(capsd: Capsd, kill: Kill, before: dict[str, Any], run: Run) -> None:
    """The slot comes back after a kill: a new pid, ready, one more restart."""
    for _ in range(600):
        after = (await asyncio.to_thread(capsd.status))["slots"][kill.slot]
        if after["pid"] != before["pid"] and after["state"] in ("ready", "busy"):
            break
        await asyncio.sleep(0.1)
    if after["restarts"] != before["restarts"] + 1 or after["pid"] == before["pid"]:
        run.problems.append(
            f"{kill.kind} kill {len(run.kills)} of slot {kill.slot}: restarts {before['restarts']} -> "
            f"{after['restarts']}, pid {before['pid']} -> {after['pid']} ({after['state']})"
        )


async def kill_random(life: int, slot: int, rng: random.Random, run: Run) -> None:
    """At a random moment, or a random part into a decode."""
    capsd = run.capsd
    busy = await poll(capsd, state_is(slot, "busy"), 5) if rng.random() < 0.5 else None
    if busy:
        await asyncio.sleep(rng.uniform(0, 1.0))
    before = (busy or await asyncio.to_thread(capsd.status))["slots"][slot]
    os.kill(before["pid"], signal.SIGKILL)
    kill = Kill("random", life, slot, before["pid"], "idle" if before["state"] == "ready" else before["state"])
    run.kills.append(kill)
    await slot_back(capsd, kill, before, run)


async def kill_during_send(life: int, rng: random.Random, run: Run) -> None:
    """A worker SIGSTOPped with no job in hand, then SIGKILLed while capsd sends it one."""
    capsd = run.capsd
    up = [s for s in (await asyncio.to_thread(capsd.status))["slots"] if s["state"] in ("ready", "busy")]
    if not up:
        run.missed["send: no worker up"] += 1
        return
    before = rng.choice(up)
    slot, pid = before["slot"], before["pid"]
    os.kill(pid, signal.SIGSTOP)
    stopped = await step_out_of_job(capsd, slot, pid)
    if stopped is None:
        os.kill(pid, signal.SIGCONT)
        run.missed[f"send: its job did not end in {STEP_LIMIT_S} s of steps"] += 1
        return
    if stopped["state"] != "busy" and await poll(capsd, state_is(slot, "busy"), JOB_WAIT_S) is None:
        os.kill(pid, signal.SIGCONT)
        run.missed[f"send: no job came in {JOB_WAIT_S} s"] += 1
        return
    queued = await poll(capsd, lambda status: any(s["queue_depth"] for s in status["slots"]), QUEUED_WAIT_S)
    note = ("mid-send" if blocked_send(capsd.proc.pid) else "written") + (", queued behind" if queued else "")
    os.kill(pid, signal.SIGKILL)
    kill = Kill("send", life, slot, pid, "busy", note)
    run.kills.append(kill)
    await slot_back(capsd, kill, before, run)


async def step_out_of_job(capsd: Capsd, slot: int, pid: int) -> dict[str, Any] | None:
    """The slot's status once its stopped worker holds no job it had before the stop: idle, or its
    job done and the next one handed over since (a busy worker is stepped: SIGCONT for 5 ms,
    SIGSTOP, status); None if that takes longer than STEP_LIMIT_S."""
    first = (await asyncio.to_thread(capsd.status))["slots"][slot]  # read after the SIGSTOP
    decoded, deadline = first["segments_decoded"], time.monotonic() + STEP_LIMIT_S
    now = first
    while now["pid"] == pid and now["state"] == "busy" and now["segments_decoded"] == decoded:
        if time.monotonic() > deadline:
            return None
        os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(STEP_S)
        os.kill(pid, signal.SIGSTOP)
        now = (await asyncio.to_thread(capsd.status))["slots"][slot]
    return now if now["pid"] == pid else None


def blocked_send(pid: int) -> bool:
    """Whether a thread of process `pid` other than its main thread is in write(2) on a socket:
    capsd's sender thread in the middle of a job for a worker that does not read."""
    for thread in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            call = (thread / "syscall").read_text().split()
            if thread.name != str(pid) and call[0] == str(WRITE_SYSCALL):
                if os.readlink(f"/proc/{pid}/fd/{int(call[1], 16)}").startswith("socket:"):
                    return True
    return False


async def stop_and_start(rng: random.Random, run: Run) -> None:
    """SIGTERM with tasks in progress, a busy worker SIGKILLed in the grace period, the exit
    waited for; then a fresh capsd on the same config and port."""
    life = run.lives[-1]
    capsd = life.capsd
    busy = await poll(capsd, lambda status: any(s["state"] == "busy" for s in status["slots"]), 10)
    life.slots = (busy or await asyncio.to_thread(capsd.status))["slots"]
    run.stopping = True
    sent = time.monotonic()
    capsd.proc.send_signal(signal.SIGTERM)
    stopping = await poll(
        capsd, lambda status: status["state"] == "stopping" and any(s["state"] == "busy" for s in status["slots"]),
        STOP_TIMEOUT_S,
    )  # fmt: skip
    if stopping:
        target = rng.choice([s for s in stopping["slots"] if s["state"] == "busy"])
        await asyncio.sleep(rng.uniform(0, 0.5))
        with contextlib.suppress(ProcessLookupError):
            os.kill(target["pid"], signal.SIGKILL)
        run.kills.append(Kill("stop", len(run.lives) - 1, target["slot"], target["pid"], "busy"))
    else:
        run.missed["stop: no worker busy in the grace period"] += 1
    with contextlib.suppress(subprocess.TimeoutExpired):
        life.exitcode = await asyncio.to_thread(
            capsd.proc.wait, STOP_TIMEOUT_S + STOP_SLACK_S + sent - time.monotonic()
        )
    life.stop_s = time.monotonic() - sent
    capsd.stop()  # its log closed; killed if it has not exited
    life = Life(run.start_capsd())  # in the list before it listens: the clients' connections are to it
    run.lives.append(life)
    await asyncio.to_thread(life.capsd.wait_ready)
    run.stopping = False


async def chaos(kinds: list[str], workers: int, rng: random.Random, deadline: float, run: Run) -> None:
    """Every 2-8 s a kill of one of `kinds`; in the soak's first half, a stop once the capsd has
    served 30-90 s. The last capsd serves the second half alone: its growth is measured."""
    halfway = deadline - (deadline - time.monotonic()) / 2
    kills = [kind for kind in kinds if kind != "stop"]
    next_stop = time.monotonic() + rng.uniform(*STOP_EVERY_S)
    while time.monotonic() + KILL_EVERY_S[1] < deadline:
        await asyncio.sleep(rng.uniform(*KILL_EVERY_S))
        if "stop" in kinds and next_stop <= time.monotonic() < halfway:
            await stop_and_start(rng, run)
            next_stop = time.monotonic() + rng.uniform(*STOP_EVERY_S)
        elif kills and rng.choice(kills) == "random":
            await kill_random(len(run.lives) - 1, rng.randrange(workers), rng, run)
        elif kills:
            await kill_during_send(len(run.lives) - 1, rng, run)


async def changer(heavy: Path, rng: random.Random, deadline: float, run: Run) -> None:
    """--pool: a change of the pool every 3-10 s, each waited for before the next."""
    capsd = run.capsd
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


async def warm_up(deadline: float, run: Run) -> None:
    """The last capsd's usage once it has served warm_s: where its growth is measured from."""
    while time.monotonic() < deadline:
        life = run.lives[-1]
        if run.warm is None and not run.stopping and time.monotonic() - life.started >= run.warm_s:
            run.warm = life, usage(life.capsd.proc.pid)
        if run.warm and run.warm[0] is not life:  # a stop came after: measured again in the next capsd
            run.warm = None
        await asyncio.sleep(1)


def usage(pid: int) -> Usage:
    process = psutil.Process(pid)
    return process.memory_info().rss, process.num_fds(), process.num_threads()


def judge_tasks(run: Run) -> tuple[dict[str, str], set[str]]:
    """The failed tasks the clients saw (id -> code), and the exact ones; records problems."""
    failed, exact = {}, set()
    for task_id, want in run.tasks.items():
        frames = run.frames.get(task_id, [])
        finals = [i for i, f in enumerate(frames) if f["is_final"]]
        if not finals:
            run.problems.append(
                f"{task_id}: no final frame ({want.source}, {len(want.digits)} digits, capsd {want.life})"
            )
            continue
        if len(finals) > 1 or finals[0] != len(frames) - 1:
            run.problems.append(f"{task_id}: {len(finals)} final frames, {len(frames) - 1 - finals[0]} after the first")
        final = frames[finals[0]]
        if "error" in final:
            failed[task_id] = final["error"]["code"]
        elif token_digits(final["tokens"]) != want.digits:
            run.problems.append(f"{task_id}: got {token_digits(final['tokens'])!r}, sent {want.digits!r}")
        elif max((abs(a - b) for a, b in zip(final["timestamps"], want.starts)), default=0) >= 0.1:
            run.problems.append(f"{task_id}: timestamps off by >= 0.1 s")
        else:
            exact.add(task_id)
    if stray := set(run.frames) - set(run.tasks):
        run.problems.append(f"frames for tasks never sent: {sorted(map(str, stray))}")
    return failed, exact


def parse_log(text: str) -> Log:
    """capsd's console log: worker exits, failed, refused and poisoned tasks, retries, critical lines."""
    exits, failed, poison, critical = [], set(), set(), []
    for line in text.splitlines():
        task = m.group(1).strip("'") if (m := re.search(r"\btask=('[^']*'|\S+)", line)) else None
        if "] worker exited " in line:
            fields = dict(re.findall(r"\b(reason|exitcode|pid)=(\S+)", line))
            lost = ast.literal_eval(m.group(1)) if (m := re.search(r"lost_tasks=(\[[^\]]*\])", line)) else []
            pid = int(fields["pid"]) if fields.get("pid", "").isdigit() else None
            exits.append(WorkerExit(pid, fields.get("reason", "?"), fields.get("exitcode", "?"), lost))
        elif ("] task failed " in line or "] task refused " in line) and task:
            failed.add(task)  # the renderer quotes a value only if it has spaces
        elif "] poison job" in line and task:
            poison.add(task)
        if "[critical" in line or "slot dispatcher failed" in line:
            critical.append(line)
    retried, paused = text.count("] job retried "), text.count("] lost jobs not retried")
    return Log(exits, failed, poison, retried, paused, critical)


def judge_lives(run: Run, logs: list[Log]) -> dict[str, bool]:
    """Each capsd: its exit, its stop's time, its log's critical lines, its growth."""
    checks = {}
    for n, (life, log) in enumerate(zip(run.lives, logs)):
        checks[f"capsd {n} exited {life.exitcode} on SIGTERM after {life.stop_s:.1f} s"] = (
            life.exitcode == 0 and life.stop_s <= STOP_TIMEOUT_S + STOP_SLACK_S
        )
        checks[f"capsd {n} logged critical lines: {log.critical}"] = not log.critical
    if run.warm and run.end:
        (rss0, fds0, threads0), (rss1, fds1, threads1) = run.warm[1], run.end
        checks[f"supervisor RSS grew by {(rss1 - rss0) / 2**20:.1f} MiB"] = rss1 - rss0 <= max(
            RSS_BOUND[0], RSS_BOUND[1] * rss0
        )
        checks[f"supervisor open files {fds0} -> {fds1}, threads {threads0} -> {threads1}"] = (
            fds1 - fds0 <= HANDLES_BOUND and threads1 - threads0 <= HANDLES_BOUND
        )
    return checks


def report_lives(run: Run) -> None:
    if run.warm and run.end:
        (rss0, fds0, threads0), (rss1, fds1, threads1) = run.warm[1], run.end
        print(
            f"supervisor of the last capsd (served {run.end_s - run.warm[0].started:.0f} s): RSS {rss0 / 2**20:.1f} MiB"
            f" after warm-up, {rss1 / 2**20:.1f} MiB at end ({(rss1 - rss0) / 2**20:+.1f} MiB); open files {fds0} ->"
            f" {fds1}, threads {threads0} -> {threads1}"
        )
    else:
        print(f"supervisor of the last capsd: not measured (served less than {run.warm_s:.0f} s)")
    stops = [life.stop_s for life in run.lives]
    print(
        f"capsd processes: {len(run.lives)}, exit codes {[life.exitcode for life in run.lives]}, from SIGTERM to exit"
        f" {min(stops):.1f}-{max(stops):.1f} s (bound {STOP_TIMEOUT_S + STOP_SLACK_S} s)"
    )


def judge_kills(run: Run, logs: list[Log], failed: dict[str, str], exact: set[str], retry: bool) -> None:
    """The kill checks (see the module's docstring), and their figures printed."""
    exit_of = {(n, e.pid): e for n, log in enumerate(logs) for e in log.exits}
    exits = list(exit_of.values())
    landed = {k: exit_of[k.life, k.pid] for k in run.kills if (k.life, k.pid) in exit_of}
    if ended := sum(k.kind == "stop" and k not in landed for k in run.kills):
        run.missed["stop: the grace period had ended"] += ended
    lost = Counter(t for e in exits for t in e.lost)
    restarted = [k for k in run.kills if k.kind != "stop"]
    restarts = sum(s["restarts"] for life in run.lives for s in life.slots)
    crashed = {clip(t) for t, code in failed.items() if code == "worker_crashed"}
    logged_failed = set().union(*(log.failed for log in logs))
    codes = {"worker_crashed", "shutting_down"} if len(run.lives) > 1 else {"worker_crashed"}
    in_last = {t for t, want in run.tasks.items() if want.life == len(run.lives) - 1}
    done, tasks_failed = (sum(s[k] for s in run.lives[-1].slots) for k in ("tasks_done", "tasks_failed"))
    checks = {
        f"failures other than {sorted(codes)}: {[(t, c) for t, c in failed.items() if c not in codes]}":
            set(failed.values()) <= codes,
        f"failed tasks: clients {sorted(failed)}, logs failed or refused {sorted(logged_failed)}":
            {clip(t) for t in failed} == logged_failed,
        f"{len(restarted)} random and send kills, {restarts} restarts": len(restarted) == restarts,
        f"random and send kills without a worker exited line for their pid: {[k for k in restarted if k not in landed]}":
            all(k in landed for k in restarted),
        f"worker exits not of a kill, or not a SIGKILL: {[e for e in exits if e not in landed.values() or e.exitcode != '-9']}":
            len(exits) == len(landed) and all((e.reason, e.exitcode) == ("crashed", "-9") for e in exits),
        f"worker exits that lost more than one task: {[e for e in exits if len(e.lost) > 1]}":
            all(len(e.lost) <= 1 for e in exits),
        f"status counts of the last capsd {done} done, {tasks_failed} failed":
            (done, tasks_failed) == (len(in_last & exact), len(in_last & set(failed))),
        **{f"{kind} kills asked for, none landed": any(k.kind == kind for k in landed) for kind in run.kinds},
    }  # fmt: skip
    twice = {t for t, n in lost.items() if n >= 2}
    if retry:
        poisoned = set().union(*(log.poison for log in logs))
        checks |= {
            f"failed by kills despite retry_lost_jobs: {sorted(crashed - twice)}": crashed <= twice,
            f"failed as poison jobs, not logged as such: {sorted(crashed - poisoned)}": crashed <= poisoned,
            f"retries paused {sum(log.paused for log in logs)} times": not any(log.paused for log in logs),
        }
    else:
        hits = [e for e in landed.values() if e.lost]
        checks |= {
            f"worker_crashed tasks: clients {sorted(crashed)}, logs lost {sorted(lost)}": crashed == set(lost),
            f"{len(crashed)} worker_crashed tasks, {len(hits)} kills that hit a segment": len(crashed) == len(hits),
        }
    run.problems += [problem for problem, ok in checks.items() if not ok]

    kinds = Counter(k.kind for k in landed)
    print(
        f"kills landed: {len(landed)}: random {kinds['random']} {dict(Counter(k.state for k in landed if k.kind == 'random'))},"
        f" send {kinds['send']} {dict(Counter(k.note for k in landed if k.kind == 'send'))}, stop {kinds['stop']};"
        f" restarts {restarts}, worker exits logged {len(exits)}"
    )
    print(f"kills missed: {sum(run.missed.values())} {dict(run.missed)}")
    exact_clipped = {clip(t) for t in exact}
    for kind in KINDS:
        hit = [t for k, e in landed.items() if k.kind == kind for t in e.lost]
        ends = Counter("exact" if t in exact_clipped else failed.get(t, "?") for t in hit)
        if kinds[kind]:
            print(f"  {kind}: {len(hit)} of {kinds[kind]} hit a segment; those tasks ended {dict(ends)}")
    if idle_lost := [
        f"slot {k.slot} pid {k.pid} lost {e.lost}" for k, e in landed.items() if k.state == "idle" and e.lost
    ]:
        print(f"  idle in status just before the kill, a job handed over meanwhile: {idle_lost}")
    if retry:
        poisoned = sorted(set().union(*(log.poison for log in logs)))
        print(
            f"  jobs retried per the logs {sum(log.retried for log in logs)}; tasks two kills hit (a job each, or one"
            f" job twice): {sorted(twice)}; poison jobs logged: {poisoned}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10, help="how long clients start tasks (default 10)")
    parser.add_argument("--workers", type=int, default=2, help="worker slots (default 2)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client connections (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for tasks and kills (default 0)")
    parser.add_argument("--heavy", action="store_true", help="the CPU-heavy self-test model (kills land mid-decode)")
    parser.add_argument(
        "--kills", type=kinds, default=list(KINDS), help="kinds of kill: random,send,stop (default all)"
    )
    parser.add_argument("--retry", action="store_true", help="[workers] retry_lost_jobs = 1: no kill may fail a task")
    parser.add_argument("--pool", action="store_true", help="change the pool (scale, roll, model) instead of killing")
    parser.add_argument("--spawn", action="store_true", help="[workers] preload = false: workers spawned, not forked")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="capsd-chaos-"))
    # With --retry, 3 lost jobs within restart_period_s pause retries; the kills come >= 2.5 s apart.
    period = 3 if args.retry else 60
    workers = {"count": args.workers, "restart_intensity": 1000, "restart_period_s": period, "preload": not args.spawn}
    config: dict[str, dict[str, Any]] = {
        "server": {"stop_timeout_s": STOP_TIMEOUT_S},
        "workers": {**workers, **({"retry_lost_jobs": 1} if args.retry else {})},
        "log": {"format": "console"},
    }
    if args.heavy or args.pool:
        build_paraformer(tmp / "heavy", heavy=True)
    if args.heavy and not args.pool:  # --pool starts on the self-test model and flips
        config["model"] = {"dir": str(tmp / "heavy")}
    print(f"machine: {machine()}")

    def start_capsd() -> Capsd:
        """The next capsd: the same config and port (the first one's), a directory and log of its own."""
        directory = tmp / f"capsd-{len(run.lives)}"
        directory.mkdir()
        if not run.lives:
            return Capsd(directory, config, wait=False)
        port = run.lives[0].capsd.port
        return Capsd(directory, {**config, "server": {**config["server"], "port": port}}, wait=False)

    run = Run(start_capsd, min(60, args.minutes * 30), [] if args.pool else args.kills)
    run.lives.append(Life(start_capsd()))
    run.capsd.wait_ready()
    started = time.monotonic()
    deadline = started + args.minutes * 60

    async def soak() -> None:
        rng = random.Random(f"{args.seed}-killer")
        disorder = changer(tmp / "heavy", rng, deadline, run) if args.pool else None
        await asyncio.gather(
            disorder or chaos(args.kills, args.workers, rng, deadline, run),
            warm_up(deadline, run),
            *(client(n, random.Random(f"{args.seed}-{n}"), deadline, run) for n in range(args.clients)),
        )

    try:
        asyncio.run(soak())
        duration = time.monotonic() - started
        last = run.lives[-1]
        last.slots, run.end, run.end_s = last.capsd.status()["slots"], usage(last.capsd.proc.pid), time.monotonic()
        done_total = task_outcomes(last.capsd).get("done", 0)  # outlives the slots that go
    finally:
        sent = time.monotonic()
        run.lives[-1].exitcode = run.capsd.stop()
        run.lives[-1].stop_s = time.monotonic() - sent

    failed, exact = judge_tasks(run)
    logs = [parse_log(life.capsd.logs()) for life in run.lives]
    run.problems += [problem for problem, ok in judge_lives(run, logs).items() if not ok]
    sources = Counter(t.source for t in run.tasks.values())
    model = "self-test and heavy models in turn" if args.pool else f"{'heavy' if args.heavy else 'self-test'} model"
    mode = "--pool" if args.pool else f"kills {','.join(args.kills)}{', --retry' if args.retry else ''}"
    started = "spawn" if args.spawn else "fork"
    print(
        f"chaos: {args.minutes:g} min, {args.workers} workers ({started}), {args.clients} clients, seed {args.seed},"
        f" {model}, {mode}, {duration:.0f} s in all"
    )
    run.problems += judge_loaders(run, started, run.changes.count("model") if args.pool else 0)
    lost = {t for log in logs for e in log.exits for t in e.lost}
    print(
        f"tasks: {len(run.tasks)} ({dict(sources)}), exact {len(exact)}, failed {len(failed)}"
        f" {dict(Counter(failed.values()))}, lost in killed workers per the logs {len(lost)}"
    )
    report_lives(run)
    if args.pool:
        exits = logs[0].exits
        checks = {
            f"failed tasks: {failed}": not failed,
            f"worker exits not asked for: {[e for e in exits if e.reason != 'requested']}":
                all(e.reason == "requested" for e in exits),
            f"capsd_tasks_total done {done_total}, exact {len(exact)}": done_total == len(exact),
        }  # fmt: skip
        run.problems += [problem for problem, ok in checks.items() if not ok]
        print(f"pool changes: {len(run.changes)} {dict(Counter(run.changes))}; worker exits logged {len(exits)},"
              f" all requested; slots at the end {len(last.slots)}")  # fmt: skip
        return conclude("chaos --pool", run.problems, tmp / "capsd-0" / "capsd.log", tmp)
    judge_kills(run, logs, failed, exact, args.retry)
    return conclude(f"chaos {mode}", run.problems, tmp / "capsd-*" / "capsd.log", tmp)


def judge_loaders(run: Run, started: str, flips: int) -> list[str]:
    """Every worker at the end started as asked; forked, each capsd started a loader, and each model
    flip started the new model's loader and stopped the old one; spawned, no loader at all
    (docs/design.md#workers-forked-from-a-loader)."""
    texts = [life.capsd.logs() for life in run.lives]
    loaders = sum(text.count("] loader started ") for text in texts)
    stopped = sum(text.count("] loader stopping ") for text in texts)
    print(f"workers {started}ed; loaders started {loaders}, stopped {stopped}, model flips {flips}")
    problems = [
        f"slot {s['slot']} started by {s['started']}"
        for s in run.lives[-1].slots
        if s["started"] not in (started, None)
    ]
    if started == "spawn" and loaders:
        problems.append(f"{loaders} loaders started with preload = false")
    if started == "fork" and (loaders < len(run.lives) + flips or stopped < flips):
        problems.append(f"{loaders} loaders started and {stopped} stopped for {len(run.lives)} capsd and {flips} flips")
    return problems


def kinds(text: str) -> list[str]:
    """--kills: a comma-separated choice out of KINDS."""
    chosen = [kind.strip() for kind in text.split(",") if kind.strip()]
    if not chosen or not set(chosen) <= set(KINDS):
        raise argparse.ArgumentTypeError(f"{text!r}: give kinds out of {','.join(KINDS)}")
    return chosen


if __name__ == "__main__":
    raise SystemExit(main())
