#!/usr/bin/env python3
"""Throughput and responsiveness of capsd serving CapsWriter clients, measured side by side in one run.

(a) Scaling: 4 files of 90 s sent at once on 4 connections, as CapsWriter's file client sends
    them (60 s frames, seg_duration 25, seg_overlap 2), to a capsd with 1 worker and to one with
    2 workers; the task ids split the files 2/2 over the 2 slots. Wall time from the first
    connection to the last final frame, and the speedup (target >= 1.8x on 2 cores).
(b) Overhead: one file of 180 s through capsd with 1 worker, against decoding exactly the same
    segments (cut by capsd's own Segmenter from the same frames) with sherpa-onnx in this
    process, one after the other; same model, same threads (target capsd/raw <= 1.10x).
(c) The machine's own ceiling for (a), no capsd at all: the segments of (b) decoded by two
    sherpa-onnx processes at once, against one process in (b).
(d) Mic latency, 2 workers: --dictations dictations of 2-6 s, half routed to each slot, sent as
    CapsWriter's mic client does (0.1 s frames paced at real time, seg_duration 15, seg_overlap 2,
    then an empty is_final frame), one after another on one connection per slot; the latency is
    from that empty final frame to the final result. Idle, then under load: on each slot a file
    client re-sends a 10 min file (60 s frames, 25/2) as soon as it is answered, for the whole
    measurement. A mic segment is taken before any waiting file segment, but a decode is never
    interrupted, so the target is: loaded p95 <= idle p95 + one file segment's decode (27 s of
    audio, decoded in this process).
(e) Time to ready with 1 and 2 workers: from starting capsd's process until it logs that it is
    ready (right after its state becomes ready).
(f) RSS of the supervisor and of each worker, idle after start, and with 2 workers after (d).
(g) One long file: 600 s sent as CapsWriter's file client sends it (60 s frames, 25/2: 24
    segments) to a capsd with 1 worker and to one with 2 workers; from connecting (the first
    frame goes at once) to the final result. The file's home is one slot; the other slot takes
    its waiting segments (work stealing), so the target is the same as (a): >= 1.8x.
(h) Random task ids: the 4 files of (a), each with a task id from uuid.uuid1() as CapsWriter's
    clients make them, so the home slots collide by chance; --draws draws of ids, each sent to
    capsd with 1 worker, with 2 workers, and with 2 workers and `work_stealing = false` (a task's
    segments decoded only on its home slot). One run per side and draw; the target is on the mean
    speedup of 2 workers over 1 with stealing (>= 1.8x), shown beside the same without stealing.
(i) The cost of metrics: the 4 files of (a) on 2 workers with `[server] metrics = true`, its
    /metrics scraped every second as Prometheus would, and on a second daemon with metrics off;
    sides alternating; target: on / off within noise (<= 1.05x).
(j) Forked against spawned workers: the 4 files of (a) on 2 workers forked from a loader
    ([workers] preload = true, the default: every other measurement's daemons) and on 2 spawned
    workers (preload = false), each warmed up first; sides alternating; target: forked / spawned
    within 2% (<= 1.02x; docs/design.md#workers-forked-from-a-loader), on the best wall time and
    on the median CPU seconds the workers spent: on a machine shared with other load, wall times
    vary by far more than 2%, and the workers' CPU time much less.
(k) The OpenAI-compatible API against the CapsWriter protocol: the 4 files of (a) on 2 workers,
    sent at once as 4 API requests by the official `openai` SDK (AsyncOpenAI, WAV uploads of
    16-bit PCM, response_format json: the upload, its decode in a process of its own, the task)
    and as 4 CapsWriter file clients (60 s frames of base64 float32), to the same capsd; the side
    that goes first alternates; target: API / protocol <= 1.10x.

All with the CPU-heavy self-test model (a real Paraformer's decode cost, RTF ~0.05 at 1 thread)
built into a temporary directory, over loopback. The daemons of (e)'s last starts serve (a)-(d),
(g) and (h) and run for the whole benchmark, idle when not measured (the daemon without
stealing only for (h)); in (a)-(c), (e) and (g)-(j) the runs alternate between the sides, so
drift and other load on the machine hit every side alike, and in (a)-(c), (e), (g), (i) and (j)
the best of --repeat runs is compared. Every final result is checked digit by digit, so a fast
wrong answer fails the benchmark instead of winning it. --only runs some of the measurements ((a)-(c) go
together), e.g. `--only g,h`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import openai
import psutil

from bench.common import (
    check_exact,
    dictate,
    keep_busy,
    machine,
    models,
    rss,
    start_capsd,
    tone_file,
    transcribe,
)
from capsd import models as model_types
from capsd.merge import PartialResult
from capsd.protocol import RATE, parse_frame, route
from capsd.segment import Segment, Segmenter
from capsd.selftest.tones import token_digits
from tests.support.checks import task_ids, wait_for
from tests.support.client import FILE_SEG, file_frames
from tests.support.daemon import Capsd
from tests.support.media import encode

THREADS = 1
LOAD_FILE_S = 600  # (d): each slot's file, re-sent as soon as it is answered
LONG_FILE_S = 600  # (g)
SECTIONS = "abcdefghijk"
MIB = 2**20
_recognizer: Any = None  # one per process of the reference pool


def load_recognizer(model_dir: Path) -> None:
    global _recognizer  # noqa: PLW0603 -- a pool process's own recognizer, made once by its initializer
    files = model_types.resolve_files("paraformer", model_dir, {})
    _recognizer = model_types.create_recognizer("paraformer", files, THREADS)


def cut_segments(frames: list[str]) -> list[Segment]:
    """The segments capsd's front cuts from these frames."""
    segmenter = None
    segments = []
    for raw in frames:
        frame = parse_frame(raw)
        segmenter = segmenter or Segmenter(frame.seg_duration, frame.seg_overlap)
        segments += segmenter.feed(frame.samples, frame.is_final)
    return segments


def decode_raw(segments: list[Segment]) -> tuple[float, str]:
    """Wall seconds to decode the segments one after another in this process, and the merged digits."""
    results = []
    start = time.perf_counter()
    for segment in segments:
        stream = _recognizer.create_stream()
        stream.accept_waveform(RATE, segment.samples)
        _recognizer.decode_stream(stream)
        results.append((list(stream.result.tokens), list(stream.result.timestamps)))
    elapsed = time.perf_counter() - start
    merged = PartialResult()
    for segment, (tokens, timestamps) in zip(segments, results):
        merged.add(segment.offset, segment.overlap, tokens, timestamps, segment.end)
    return elapsed, token_digits(merged.tokens)


def cpu_meter(daemon: Capsd) -> Callable[[], str]:
    """From now on, count the CPU of the supervisor and of each worker, and the segments each slot's
    worker decodes; the returned function says where it went until it is called."""
    slots = daemon.status()["slots"]
    processes = [psutil.Process(daemon.proc.pid), *(psutil.Process(s["pid"]) for s in slots)]
    before = [sum(p.cpu_times()[:2]) for p in processes]
    decoded = [s["segments_decoded"] for s in slots]
    start = time.perf_counter()

    def where() -> str:
        elapsed = time.perf_counter() - start
        cpu = [sum(p.cpu_times()[:2]) - b for p, b in zip(processes, before)]
        busy = " ".join(f"{c / elapsed:.0%}" for c in cpu[1:])
        segments = " ".join(str(s["segments_decoded"] - d) for s, d in zip(daemon.status()["slots"], decoded))
        return f"worker CPU / wall {busy}, segments decoded {segments}, supervisor CPU {cpu[0]:.2f} s"

    return where


def serve(daemon: Capsd, tasks: dict[str, list[str]], digits: dict[str, str]) -> tuple[float, str]:
    """Wall seconds for capsd to answer every task exactly, and where the CPU went meanwhile."""
    where = cpu_meter(daemon)
    elapsed, finals = transcribe(daemon.url, tasks)
    note = where()
    for task_id, final in finals.items():
        check_exact(final, digits[task_id])
    return elapsed, note


def segment_decode(repeat: int) -> list[float]:
    """Seconds for sherpa-onnx in this process to decode one file segment (25 + 2 s), `repeat` times."""
    samples, digits = tone_file(sum(FILE_SEG), 3)
    times = []
    for _ in range(repeat):
        elapsed, decoded = decode_raw([Segment(0, 0.0, 0.0, samples, True)])
        if decoded != digits:
            raise SystemExit("wrong result from sherpa-onnx without capsd")
        times.append(elapsed)
    return times


def wait_idle(daemon: Capsd) -> None:
    """Until the segments of the clients that left are decoded or dropped."""
    def idle() -> bool:
        return all(s["state"] == "ready" and not s["queue_depth"] for s in daemon.status()["slots"])

    wait_for(idle, 30, "capsd idle after its clients left", every=0.1)


def mic_latency(daemon: Capsd, count: int) -> dict[str, Any]:
    """(d) on a capsd with 2 workers: `count` dictations idle, then the same under load."""
    rng = np.random.default_rng(7)
    ids = task_ids(2, slots=[n % 2 for n in range(count)] + [0, 1])
    dictations = [(task_id, *tone_file(rng.uniform(2, 6), 1000 + n)) for n, task_id in enumerate(ids[:count])]
    load = []
    for slot, task_id in enumerate(ids[count:]):
        samples, digits = tone_file(LOAD_FILE_S, 2000 + slot)
        load.append((task_id, file_frames(task_id, samples), digits))

    async def both_slots() -> list[float]:
        per_slot = await asyncio.gather(*(dictate(daemon.url, dictations[slot::2]) for slot in (0, 1)))
        return per_slot[0] + per_slot[1]

    async def loaded() -> tuple[list[float], str, int]:
        answered: list[str] = []
        busy = [asyncio.create_task(keep_busy(daemon.url, *file, answered)) for file in load]
        await asyncio.sleep(1)  # both workers are decoding file segments
        where = cpu_meter(daemon)
        latencies = await both_slots()
        note = where()
        for task in busy:
            if task.done():
                task.result()  # raises what ended it
                raise SystemExit("the load ended before the dictations")
            task.cancel()
        await asyncio.gather(*busy, return_exceptions=True)
        return latencies, note, len(answered)

    idle = asyncio.run(both_slots())
    under_load, where, answered = asyncio.run(loaded())
    wait_idle(daemon)
    return {
        "idle": idle,
        "loaded": under_load,
        "cpu": where,
        "answered": answered,
        "seconds": [len(samples) / RATE for _, samples, _ in dictations],
    }


def runs(label: str, times: list[float]) -> str:
    listed = " ".join(f"{t:.2f}" for t in times)
    return f"  {label:<38} {min(times):6.2f} s   median {statistics.median(times):6.2f} s   runs: {listed}"


def verdict(ratio: float, ok: bool, target: str) -> str:
    return f"{ratio:.2f}x   target {target}   {'met' if ok else 'NOT MET'}"


def at_best(times: list[float], notes: list[str]) -> str:
    """The note of the fastest run."""
    return notes[times.index(min(times))]


def four_files() -> list[tuple[np.ndarray, str]]:
    """The 4 files of 90 s of (a) and (h), and their digits."""
    return [tone_file(90, seed) for seed in range(4)]


def measure(daemons: dict[int, Capsd], pool: ProcessPoolExecutor, repeat: int) -> dict[str, Any]:
    """(a), (b) and (c), their runs interleaved."""
    files = four_files()
    ids = task_ids(2, slots=[0, 0, 1, 1])
    four = {task_id: file_frames(task_id, samples) for task_id, (samples, _) in zip(ids, files)}
    long_samples, long_digits = tone_file(180, 99)
    long_frames = file_frames("long", long_samples)
    segments = cut_segments(long_frames)
    four_digits = {task_id: digits for task_id, (_, digits) in zip(ids, files)}
    times: dict[str, list[float]] = {"1w": [], "2w": [], "capsd": [], "raw": [], "raw2": []}
    cpu: dict[str, list[str]] = {"1w": [], "2w": [], "capsd": []}
    for _ in range(repeat):
        for key, daemon, tasks, expected in (
            ("1w", daemons[1], four, four_digits),
            ("2w", daemons[2], four, four_digits),
            ("capsd", daemons[1], {"long": long_frames}, {"long": long_digits}),
        ):
            elapsed, where = serve(daemon, tasks, expected)
            times[key].append(elapsed)
            cpu[key].append(where)
        elapsed, digits = decode_raw(segments)
        times["raw"].append(elapsed)
        start = time.perf_counter()
        both = list(pool.map(decode_raw, [segments, segments]))
        times["raw2"].append(time.perf_counter() - start)
        if {digits} | {d for _, d in both} != {long_digits}:
            raise SystemExit("wrong result from sherpa-onnx without capsd")
    return {
        "times": times,
        "cpu": {key: at_best(times[key], notes) for key, notes in cpu.items()},
        "per_file": len(cut_segments(next(iter(four.values())))),
        "segments": len(segments),
        "decoded_s": sum(len(s.samples) for s in segments) / RATE,
    }


def one_long_file(daemons: dict[int, Capsd], repeat: int) -> dict[str, Any]:
    """(g): one long file to 1 worker and to 2 workers, sides alternating, `repeat` runs each."""
    samples, digits = tone_file(LONG_FILE_S, 600)
    task_id = f"long-{LONG_FILE_S}"
    frames = file_frames(task_id, samples)
    times: dict[int, list[float]] = {1: [], 2: []}
    cpu: dict[int, list[str]] = {1: [], 2: []}
    for _ in range(repeat):
        for count in (1, 2):
            elapsed, where = serve(daemons[count], {task_id: frames}, {task_id: digits})
            times[count].append(elapsed)
            cpu[count].append(where)
    return {
        "times": times,
        "cpu": {count: at_best(times[count], notes) for count, notes in cpu.items()},
        "segments": len(cut_segments(frames)),
        "home": route(task_id, 2),
    }


def warm_up(daemon: Capsd, count: int) -> None:
    """One file segment decoded by each worker: a fresh worker's first decode is slower (its arena grows)."""
    samples, digits = tone_file(sum(FILE_SEG), 5)
    ids = task_ids(count)
    serve(daemon, {task_id: file_frames(task_id, samples) for task_id in ids}, dict.fromkeys(ids, digits))


def random_ids(daemons: dict[int, Capsd], strict: Capsd, draws: int) -> list[dict[str, Any]]:
    """(h): per draw of uuid1 task ids for the 4 files, their home slots out of 2 and the seconds
    with 1 worker, with 2 workers, and with 2 workers without stealing (`strict`), each warmed up
    first (one run per side: a cold worker would count against its side)."""
    for count, daemon in ((1, daemons[1]), (2, daemons[2]), (2, strict)):
        warm_up(daemon, count)
    files = four_files()
    rows = []
    for _ in range(draws):
        ids = [str(uuid.uuid1()) for _ in files]
        tasks = {task_id: file_frames(task_id, samples) for task_id, (samples, _) in zip(ids, files)}
        digits = {task_id: digits for task_id, (_, digits) in zip(ids, files)}
        row: dict[str, Any] = {"slots": [route(task_id, 2) for task_id in ids]}
        for key, daemon in (("1w", daemons[1]), ("2w", daemons[2]), ("strict", strict)):
            row[key], row[f"{key} cpu"] = serve(daemon, tasks, digits)
        rows.append(row)
    return rows


def report_scaling(m: dict[str, Any]) -> None:
    times = m["times"]
    seg = f"seg_duration {FILE_SEG[0]:g}, seg_overlap {FILE_SEG[1]:g}"
    print(f"(a) 4 files x 90 s at once, 4 connections, file client: 60 s frames, {seg} ({m['per_file']} segments/file)")
    print(runs("capsd, 1 worker", times["1w"]))
    print(runs("capsd, 2 workers (2 files per slot)", times["2w"]))
    print(f"  in the best runs: 1 worker: {m['cpu']['1w']}; 2 workers: {m['cpu']['2w']}")
    speedup = min(times["1w"]) / min(times["2w"])
    print(f"  speedup 2 workers / 1 worker          {verdict(speedup, speedup >= 1.8, '>= 1.8x')}\n")
    print(f"(b) 1 file x 180 s, {seg} ({m['segments']} segments, {m['decoded_s']:.0f} s decoded)")
    print(runs("capsd, 1 worker", times["capsd"]))
    print(runs("sherpa-onnx in process, same segments", times["raw"]))
    print(f"  in the best capsd run: {m['cpu']['capsd']}")
    overhead = min(times["capsd"]) / min(times["raw"])
    print(f"  capsd / raw                           {verdict(overhead, overhead <= 1.10, '<= 1.10x')}\n")
    print("(c) the machine's ceiling for (a), no capsd: the segments of (b) decoded in 2 processes at once")
    print(runs("2 x sherpa-onnx, twice the work of (b)", times["raw2"]))
    print(f"  speedup vs 1 process in (b)           {2 * min(times['raw']) / min(times['raw2']):.2f}x\n")


def report_mic(mic: dict[str, Any], segment_times: list[float]) -> None:
    segment = statistics.median(segment_times)
    idle, loaded = (np.percentile(mic[side], [50, 95]) for side in ("idle", "loaded"))
    print(
        f"(d) mic latency, 2 workers: {len(mic['idle'])} dictations of {min(mic['seconds']):.1f}-"
        f"{max(mic['seconds']):.1f} s, half on each slot, 0.1 s frames at real time, seg_duration 15, seg_overlap 2;"
        " from the empty final frame to the final result"
    )
    for label, side, (p50, p95) in (("idle", "idle", idle), ("under load", "loaded", loaded)):
        print(f"  {label:<38} p50 {p50:5.2f} s   p95 {p95:5.2f} s   max {max(mic[side]):5.2f} s")
    print(
        f"  the load: a file client per slot re-sending {LOAD_FILE_S // 60} min files;"
        f" {mic['answered']} files answered exactly during it; {mic['cpu']}"
    )
    listed = " ".join(f"{t:.2f}" for t in segment_times)
    print(f"  one file segment (27 s) decoded in this process {segment:.2f} s median   runs: {listed}")
    print(
        f"  loaded p95 - idle p95                 {loaded[1] - idle[1]:.2f} s   target <= {segment:.2f} s"
        f"   {'met' if loaded[1] <= idle[1] + segment else 'NOT MET'}\n"
    )


def report_ready(ready: dict[int, list[float]]) -> None:
    print("(e) time to ready: from starting capsd's process to its log saying ready (polled every 20 ms)")
    for count, seconds in ready.items():
        print(runs(f"{count} worker{'s' if count > 1 else ''}", seconds))
    print()


def report_rss(measured: dict[str, tuple[int, list[int]]]) -> None:
    print("(f) RSS in MiB: supervisor (its process and multiprocessing's resource tracker), each worker")
    for label, (supervisor, workers) in measured.items():
        print(
            f"  {label:<38} supervisor {supervisor / MIB:6.1f}   workers {' '.join(f'{w / MIB:6.1f}' for w in workers)}"
        )
    print()


def report_long_file(g: dict[str, Any]) -> None:
    times = g["times"]
    print(
        f"(g) 1 file x {LONG_FILE_S} s, file client: 60 s frames, seg_duration {FILE_SEG[0]:g}, seg_overlap"
        f" {FILE_SEG[1]:g} ({g['segments']} segments), its home slot {g['home']} of 2; from connecting to the final result"
    )
    print(runs("capsd, 1 worker", times[1]))
    print(runs("capsd, 2 workers (work stealing)", times[2]))
    print(f"  in the best runs: 1 worker: {g['cpu'][1]}; 2 workers: {g['cpu'][2]}")
    speedup = min(times[1]) / min(times[2])
    print(f"  speedup 2 workers / 1 worker          {verdict(speedup, speedup >= 1.8, '>= 1.8x')}\n")


def report_random_ids(rows: list[dict[str, Any]]) -> None:
    print(
        f"(h) the 4 files of (a) at once, 4 connections, task ids from uuid.uuid1() (home slot crc32 % 2, colliding"
        f" by chance); {len(rows)} draws, one run per side"
    )
    print("  draw  home slots   1 worker    2 workers            2 workers, work_stealing = false")
    for n, row in enumerate(rows, 1):
        slots = " ".join(map(str, row["slots"]))
        print(
            f"  {n:4}  {slots:<10} {row['1w']:7.2f} s   {row['2w']:7.2f} s  {row['1w'] / row['2w']:5.2f}x"
            f"     {row['strict']:7.2f} s  {row['1w'] / row['strict']:5.2f}x"
        )
    stealing = statistics.mean(row["1w"] / row["2w"] for row in rows)
    strict = statistics.mean(row["1w"] / row["strict"] for row in rows)
    print(f"  mean speedup 2 workers / 1 worker     {verdict(stealing, stealing >= 1.8, '>= 1.8x')}")
    print(f"  the same with work_stealing = false   {strict:.2f}x")
    print("  per draw, 2 workers with stealing, then without:")
    for n, row in enumerate(rows, 1):
        print(f"  {n:4}  {row['2w cpu']}\n        {row['strict cpu']}")
    print()


def metrics_cost(daemons: dict[bool, Capsd], repeat: int) -> dict[bool, list[float]]:
    """(i): the 4 files of (a) on 2 workers with [server] metrics on, scraped every second as
    Prometheus would, and off; sides alternating."""
    files = four_files()
    ids = task_ids(2, slots=[0, 0, 1, 1])
    tasks = {task_id: file_frames(task_id, samples) for task_id, (samples, _) in zip(ids, files)}
    digits = {task_id: d for task_id, (_, d) in zip(ids, files)}
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeat):
        for on in (True, False):
            stop = threading.Event()
            scraper = threading.Thread(target=scrape, args=(daemons[on], stop)) if on else None
            if scraper:
                scraper.start()
            times[on].append(serve(daemons[on], tasks, digits)[0])
            stop.set()
            if scraper:
                scraper.join()
    return times


@contextlib.contextmanager
def beside(tmp: Path, model_dir: Path, **options: Any) -> Iterator[Capsd]:
    """A second daemon of 2 workers, unlike the others by `options`, for one measurement."""
    daemon, _ = start_capsd(tmp, model_dir, 2, THREADS, **options)
    try:
        yield daemon
    finally:
        daemon.stop()


def workers_cpu(daemon: Capsd) -> float:
    """CPU seconds (user + system) the daemon's workers have used so far."""
    return sum(sum(psutil.Process(slot["pid"]).cpu_times()[:2]) for slot in daemon.status()["slots"])


def forked_vs_spawned(daemons: dict[bool, Capsd], repeat: int) -> dict[str, dict[bool, list[float]]]:
    """(j): the 4 files of (a) on 2 forked workers and on 2 spawned ones, sides alternating: wall
    seconds, and the CPU seconds the workers spent, which other load on the machine barely moves."""
    files = four_files()
    ids = task_ids(2, slots=[0, 0, 1, 1])
    tasks = {task_id: file_frames(task_id, samples) for task_id, (samples, _) in zip(ids, files)}
    digits = {task_id: d for task_id, (_, d) in zip(ids, files)}
    for daemon in daemons.values():
        warm_up(daemon, 2)
    m: dict[str, dict[bool, list[float]]] = {"wall": {True: [], False: []}, "cpu": {True: [], False: []}}
    for _ in range(repeat):
        for forked, daemon in daemons.items():
            before = workers_cpu(daemon)
            m["wall"][forked].append(serve(daemon, tasks, digits)[0])
            m["cpu"][forked].append(workers_cpu(daemon) - before)
    return m


def report_forked(m: dict[str, dict[bool, list[float]]]) -> None:
    print("(j) the 4 files of (a) on 2 workers forked from a loader and on 2 spawned workers; wall, then workers' CPU")
    for key in ("wall", "cpu"):
        print(runs(f"forked (preload = true), {key}", m[key][True]))
        print(runs(f"spawned (preload = false), {key}", m[key][False]))
    ratio = min(m["wall"][True]) / min(m["wall"][False])
    print(f"  forked / spawned, wall                {verdict(ratio, ratio <= 1.02, '<= 1.02x')}")
    cpu = statistics.median(m["cpu"][True]) / statistics.median(m["cpu"][False])
    print(f"  forked / spawned, CPU (medians)       {verdict(cpu, cpu <= 1.02, '<= 1.02x')}\n")


def scrape(daemon: Capsd, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.port}/metrics", timeout=10) as response:
            response.read()


def report_metrics_cost(times: dict[bool, list[float]]) -> None:
    print("(i) the 4 files of (a) on 2 workers, [server] metrics on (scraped every second) and off")
    print(runs("metrics on, scraped", times[True]))
    print(runs("metrics off", times[False]))
    ratio = min(times[True]) / min(times[False])
    print(f"  on / off                              {verdict(ratio, ratio <= 1.05, '<= 1.05x (noise)')}\n")


def api_against_protocol(daemon: Capsd, repeat: int) -> dict[str, list[float]]:
    """(k): the 4 files of (a) through the API and through the CapsWriter protocol, to `daemon`
    (2 workers); the side that goes first alternates, `repeat` runs each."""
    files = four_files()
    ids = task_ids(2, slots=[0, 0, 1, 1])
    tasks = {task_id: file_frames(task_id, samples) for task_id, (samples, _) in zip(ids, files)}
    digits = {task_id: d for task_id, (_, d) in zip(ids, files)}
    uploads = [(f"{task_id}.wav", encode(samples), d) for task_id, (samples, d) in zip(ids, files)]
    warm_up(daemon, 2)
    warm, warm_digits = tone_file(5, 6)
    transcribe_api(daemon, [("warm.wav", encode(warm), warm_digits)])  # the decode process's first start is slower
    times: dict[str, list[float]] = {"api": [], "protocol": []}
    for n in range(repeat):
        for side in ("api", "protocol") if n % 2 == 0 else ("protocol", "api"):
            times[side].append(transcribe_api(daemon, uploads) if side == "api" else serve(daemon, tasks, digits)[0])
    return times


def transcribe_api(daemon: Capsd, uploads: list[tuple[str, bytes, str]]) -> float:
    """Wall seconds for capsd to answer every upload (name, bytes, digits), all at once through
    the official SDK, each answer exact."""

    async def run() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=daemon.api_url, api_key="bench", max_retries=0, timeout=600) as api:
            return await asyncio.gather(*(api.audio.transcriptions.create(file=(name, data), model="whisper-1")
                                          for name, data, _ in uploads))  # fmt: skip

    start = time.perf_counter()
    answers = asyncio.run(run())
    elapsed = time.perf_counter() - start
    for (name, _, digits), answer in zip(uploads, answers):
        if token_digits(answer.text) != digits:
            raise SystemExit(f"wrong result for {name} through the API: {answer.text[:80]}")
    return elapsed


def report_api(times: dict[str, list[float]]) -> None:
    print("(k) the 4 files of (a) on 2 workers at once: 4 API requests (openai SDK, WAV) against 4 CapsWriter file clients")
    print(runs("API, openai SDK", times["api"]))
    print(runs("CapsWriter protocol", times["protocol"]))
    ratio = min(times["api"]) / min(times["protocol"])
    print(f"  API / protocol                        {verdict(ratio, ratio <= 1.10, '<= 1.10x')}\n")


def report(m: dict[str, Any], repeat: int) -> None:
    print(f"model: heavy self-test paraformer, threads {THREADS}; best of {repeat} runs, sides alternating\n")
    if "scaling" in m:
        report_scaling(m["scaling"])
    if "mic" in m:
        report_mic(m["mic"], m["segment"])
    if "ready" in m:
        report_ready(m["ready"])
    if "rss" in m:
        report_rss(m["rss"])
    if "long" in m:
        report_long_file(m["long"])
    if "random" in m:
        report_random_ids(m["random"])
    if "metrics" in m:
        report_metrics_cost(m["metrics"])
    if "forked" in m:
        report_forked(m["forked"])
    if "api" in m:
        report_api(m["api"])


def sections(text: str) -> set[str]:
    """--only: letters of the measurements to run, e.g. "g,h"."""
    chosen = set(text.replace(",", "").replace(" ", ""))
    if not chosen or not chosen <= set(SECTIONS):
        raise argparse.ArgumentTypeError(f"{text!r}: give letters out of {SECTIONS}, e.g. g,h")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="runs per side; the best is compared (default 3)")
    parser.add_argument("--dictations", type=int, default=30, help="dictations idle and under load in (d) (default 30)")
    parser.add_argument("--draws", type=int, default=5, help="draws of random task ids in (h) (default 5)")
    parser.add_argument(
        "--only", type=sections, default=set(SECTIONS), help="measurements to run, e.g. g,h ((a)-(c) go together)"
    )
    args = parser.parse_args()
    only: set[str] = args.only
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="capsd-bench-") as tmp:
        model_dir = models(Path(tmp))["heavy"]
        load_recognizer(model_dir)
        daemons: dict[int, Capsd] = {}
        m: dict[str, Any] = {}
        ready: dict[int, list[float]] = {1: [], 2: []}
        spawn = multiprocessing.get_context("spawn")
        try:
            for _ in range(args.repeat if "e" in only else 1):
                for count in (1, 2):
                    if count in daemons:
                        daemons.pop(count).stop()
                    daemons[count], seconds = start_capsd(Path(tmp), model_dir, count, THREADS)
                    ready[count].append(seconds)
            if "e" in only:
                m["ready"] = ready
            if "f" in only:
                m["rss"] = {f"{c} worker{'s' if c > 1 else ''}, idle after start": rss(d) for c, d in daemons.items()}
            if "d" in only:
                m["segment"] = segment_decode(args.repeat)
                m["mic"] = mic_latency(daemons[2], args.dictations)
                if "f" in only:
                    m["rss"]["2 workers, idle after (d)"] = rss(daemons[2])
            if only & set("abc"):
                with ProcessPoolExecutor(2, spawn, initializer=load_recognizer, initargs=(model_dir,)) as pool:
                    m["scaling"] = measure(daemons, pool, args.repeat)
            if "g" in only:
                m["long"] = one_long_file(daemons, args.repeat)
            if "h" in only:
                with beside(Path(tmp), model_dir, work_stealing=False) as strict:
                    m["random"] = random_ids(daemons, strict, args.draws)
            if "i" in only:
                with beside(Path(tmp), model_dir, metrics=False) as off:
                    m["metrics"] = metrics_cost({True: daemons[2], False: off}, args.repeat)
            if "j" in only:
                if {s["started"] for s in daemons[2].status()["slots"]} != {"fork"}:
                    raise SystemExit("(j): the default daemon's workers are not forked from a loader")
                with beside(Path(tmp), model_dir, preload=False) as spawned:
                    m["forked"] = forked_vs_spawned({True: daemons[2], False: spawned}, args.repeat)
            if "k" in only:
                m["api"] = api_against_protocol(daemons[2], args.repeat)
        finally:
            for daemon in daemons.values():
                daemon.stop()
    report(m, args.repeat)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
