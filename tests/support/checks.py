"""What integration tests share: exactness checks, clients, task ids per slot, waiting."""

from __future__ import annotations

import asyncio
import http.client
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import numpy as np
import psutil
from prometheus_client.parser import text_string_to_metric_families

from capsd.protocol import route
from capsd.selftest.tones import synth, token_digits
from tests.support.client import connect, receive, send_file, send_mic

FRAME_FIELDS = {"task_id", "is_final", "duration", "time_start", "time_submit", "time_complete", "text", "text_accu",
                "tokens", "timestamps"}  # fmt: skip
GOOD_DIGITS = "4711"
# A dictation waits at most for the segment in progress: a few seconds on a busy machine, never
# the minutes an abuse alongside would cost without its bound.
PROMPT_S = 15
T = TypeVar("T")


def assert_exact(frames: list[dict[str, Any]], digits: str, starts: list[float]) -> None:
    final = frames[-1]
    assert FRAME_FIELDS <= final.keys()
    assert final["is_final"] and "error" not in final, final.get("error")
    assert [f["is_final"] for f in frames].count(True) == 1
    assert token_digits(final["tokens"]) == digits
    assert final["text"] == digits  # Chinese numerals formatted to Arabic digits
    assert final["text_accu"] == final["text"]  # formatted too, as CapsWriter since v2.2
    assert "".join(final["tokens"]) == final["text_accu"].replace(" ", "")  # tokens realigned to it
    assert max(abs(a - b) for a, b in zip(final["timestamps"], starts)) < 0.1
    assert final["timestamps"] == sorted(final["timestamps"])
    partial_lengths = [len(f["tokens"]) for f in frames[:-1]]
    assert partial_lengths == sorted(partial_lengths)  # partials arrive in order, growing


async def dictate(url: str, task_id: str, within: float = PROMPT_S) -> None:
    """A CapsWriter dictation: exact, and answered within `within` s of its final frame."""
    samples, starts = synth(GOOD_DIGITS)
    async with connect(url) as ws:
        await send_mic(ws, task_id, samples)
        sent = time.monotonic()
        frames = await receive(ws, {task_id}, timeout=120)
        waited = time.monotonic() - sent
    assert_exact(frames[task_id], GOOD_DIGITS, starts)
    assert waited < within, waited


def accepted_per_second(sent: list[tuple[float, float]], stretch_s: float) -> tuple[float, float]:
    """Audio seconds a stream had accepted per second in its first and in its last `stretch_s`,
    from (time.monotonic(), audio seconds sent so far) after each frame (stream_endless's `sent`)."""
    start, end = sent[0][0], sent[-1][0]
    first = max(audio for t, audio in sent if t <= start + stretch_s) / stretch_s
    before_last = max((audio for t, audio in sent if t <= end - stretch_s), default=0.0)
    return first, (sent[-1][1] - before_last) / stretch_s


def task_ids(count: int, prefix: str = "task", slots: Iterable[int] | None = None) -> list[str]:
    """Task ids (all different) homed one on each slot out of `count`, or one on each of `slots`,
    so tests and benches choose where work lands."""
    ids, n = [], 0
    for slot in range(count) if slots is None else slots:
        while route(f"{prefix}-{n}", count) != slot:
            n += 1
        ids.append(f"{prefix}-{n}")
        n += 1
    return ids


async def run_client(url: str, jobs: list[tuple[str, str, np.ndarray, tuple[float, float]]]) -> dict[str, Any]:
    async with connect(url) as ws:
        for task_id, source, samples, seg in jobs:
            if source == "file":
                await send_file(ws, task_id, samples, seg=seg)
            else:
                await send_mic(ws, task_id, samples, seg=seg)
        return await receive(ws, {job[0] for job in jobs})


async def stop_while_decoding(capsd: Any, ws: Any, samples: np.ndarray, task_id: str = "finishing") -> None:
    """A graceful stop with a task in progress: send a file task, and once slot 0's worker is
    decoding it, SIGTERM capsd; returns when capsd has logged that it is stopping."""
    await send_file(ws, task_id, samples, seg=(15, 2))
    await asyncio.to_thread(wait_for, lambda: capsd.status()["slots"][0]["state"] == "busy", 30, "busy")
    capsd.proc.send_signal(signal.SIGTERM)
    await asyncio.to_thread(wait_for, lambda: "stopping" in capsd.logs(), 30, "stopping")


def stop_loading_workers(capsd: Any, timeout: float = 30, old: tuple[int, ...] = ()) -> list[psutil.Process]:
    """SIGSTOP capsd's new worker processes as soon as they run (multiprocessing's spawn_main),
    before they have loaded the model; not those in `old`: workers running, or just killed and
    lingering for an instant. With forked workers (the default), it holds the loader instead."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            workers = [p for p in psutil.Process(capsd.proc.pid).children()
                       if p.pid not in old and "spawn_main" in " ".join(p.cmdline())]  # fmt: skip
        except psutil.Error:
            workers = []
        if workers:
            for p in workers:
                p.send_signal(signal.SIGSTOP)
            return workers
        time.sleep(0.005)
    raise AssertionError("no worker appeared")


def most_slots_down(log: str, count: int) -> int:
    """The most of `count` slots at once neither ready nor busy, from the log's `slot state` lines."""
    states, most = dict.fromkeys(range(count), "ready"), 0
    for line in log.splitlines():
        if "slot state" in line:
            fields = dict(word.split("=", 1) for word in line.split() if "=" in word)
            states[int(fields["slot"])] = fields["after"]
            most = max(most, sum(state not in ("ready", "busy") for state in states.values()))
    return most


def wait_for(condition: Callable[[], T], timeout: float = 30, what: str = "", every: float = 0.05) -> T:
    """condition() every `every` s until it returns something true; that value, or after
    `timeout` s an AssertionError naming `what` and the last value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout:g} s still waiting for {what or condition} (last: {value!r})")
        time.sleep(every)
    return value


def scrape(capsd: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics: each sample by its name and sorted labels."""
    status, body = http_get(capsd.port, "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def task_outcomes(capsd: Any) -> dict[str, float]:
    """capsd_tasks_total by outcome, summed over sources."""
    outcomes: dict[str, float] = {}
    for (name, labels), value in scrape(capsd).items():
        if name == "capsd_tasks_total":
            outcome = dict(labels)["outcome"]
            outcomes[outcome] = outcomes.get(outcome, 0) + value
    return outcomes


def http_get(port: int, path: str) -> tuple[int, str]:
    """A plain GET on 127.0.0.1:port, as a balancer's health check or a scraper does."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()
