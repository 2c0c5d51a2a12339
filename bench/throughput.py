#!/usr/bin/env python3
"""Throughput of capsd serving CapsWriter file clients, measured side by side in one run.

(a) Scaling: 4 files of 90 s sent at once on 4 connections, as CapsWriter's file client sends
    them (60 s frames, seg_duration 25, seg_overlap 2), to a capsd with 1 worker and to one with
    2 workers; the task ids split the files 2/2 over the 2 slots. Wall time from the first
    connection to the last final frame, and the speedup (target >= 1.8x on 2 cores).
(b) Overhead: one file of 180 s through capsd with 1 worker, against decoding exactly the same
    segments (cut by capsd's own Segmenter from the same frames) with sherpa-onnx in this
    process, one after the other; same model, same threads (target capsd/raw <= 1.10x).
(c) The machine's own ceiling for (a), no capsd at all: the segments of (b) decoded by two
    sherpa-onnx processes at once, against one process in (b).

All with the CPU-heavy self-test model (a real Paraformer's decode cost, RTF ~0.05 at 1 thread)
built into a temporary directory, over loopback. Both daemons run for the whole benchmark, idle
when not measured, and the runs alternate between the sides, so drift and other load on the
machine hit every side alike; the best of --repeat runs is compared. Every final result is
checked digit by digit, so a fast wrong answer fails the benchmark instead of winning it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import psutil
from common import FILE_SEG, check_exact, file_frames, machine, models, task_ids, tone_file, transcribe

from capsd import models as model_types
from capsd.merge import PartialResult
from capsd.protocol import parse_frame
from capsd.segment import Segment, Segmenter
from capsd.selftest.daemon import Capsd
from capsd.selftest.tones import token_digits

THREADS = 1
_recognizer: Any = None  # one per process of the reference pool


def load_recognizer(model_dir: Path) -> None:
    global _recognizer
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
        stream.accept_waveform(16000, segment.samples)
        _recognizer.decode_stream(stream)
        results.append((list(stream.result.tokens), list(stream.result.timestamps)))
    elapsed = time.perf_counter() - start
    merged = PartialResult()
    for segment, (tokens, timestamps) in zip(segments, results):
        merged.add(segment.offset, segment.overlap, tokens, timestamps, segment.end)
    return elapsed, token_digits(merged.tokens)


def serve(daemon: Capsd, tasks: dict[str, list[str]], digits: dict[str, str]) -> tuple[float, str]:
    """Wall seconds for capsd to answer every task exactly, and where the CPU went meanwhile."""
    processes = [psutil.Process(daemon.proc.pid), *(psutil.Process(s["pid"]) for s in daemon.status()["slots"])]
    before = [sum(p.cpu_times()[:2]) for p in processes]
    elapsed, finals = transcribe(daemon.url, tasks)
    cpu = [sum(p.cpu_times()[:2]) - b for p, b in zip(processes, before)]
    for task_id, final in finals.items():
        check_exact(final, digits[task_id])
    busy = " ".join(f"{c / elapsed:.0%}" for c in cpu[1:])
    return elapsed, f"worker CPU / wall {busy}, supervisor CPU {cpu[0]:.2f} s"


def runs(label: str, times: list[float]) -> str:
    listed = " ".join(f"{t:.2f}" for t in times)
    return f"  {label:<38} {min(times):6.2f} s   median {statistics.median(times):6.2f} s   runs: {listed}"


def verdict(ratio: float, ok: bool, target: str) -> str:
    return f"{ratio:.2f}x   target {target}   {'met' if ok else 'NOT MET'}"


def measure(model_dir: Path, daemons: dict[int, Capsd], pool: ProcessPoolExecutor, repeat: int) -> dict[str, Any]:
    files = [tone_file(90, seed) for seed in range(4)]
    ids = task_ids([0, 0, 1, 1], 2)
    four = {task_id: file_frames(task_id, samples) for task_id, (samples, _) in zip(ids, files)}
    long_samples, long_digits = tone_file(180, 99)
    long_frames = file_frames("long", long_samples)
    segments = cut_segments(long_frames)
    load_recognizer(model_dir)
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
        "cpu": {key: notes[times[key].index(min(times[key]))] for key, notes in cpu.items()},
        "per_file": len(cut_segments(next(iter(four.values())))),
        "segments": len(segments),
        "decoded_s": sum(len(s.samples) for s in segments) / 16000,
    }


def report(m: dict[str, Any], repeat: int) -> None:
    times = m["times"]
    seg = f"seg_duration {FILE_SEG[0]:g}, seg_overlap {FILE_SEG[1]:g}"
    print(f"model: heavy self-test paraformer, threads {THREADS}; best of {repeat} runs, sides alternating\n")
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
    print(f"  speedup vs 1 process in (b)           {2 * min(times['raw']) / min(times['raw2']):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="runs per side; the best is compared (default 3)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="capsd-bench-") as tmp:
        model_dir = models(Path(tmp))["heavy"]
        daemons: dict[int, Capsd] = {}
        spawn = multiprocessing.get_context("spawn")
        try:
            for count in (1, 2):
                (Path(tmp) / f"w{count}").mkdir()
                config = {"workers": {"count": count, "threads": THREADS}, "model": {"dir": str(model_dir)}}
                daemons[count] = Capsd(Path(tmp) / f"w{count}", config)
            with ProcessPoolExecutor(2, spawn, initializer=load_recognizer, initargs=(model_dir,)) as pool:
                measured = measure(model_dir, daemons, pool, args.repeat)
        finally:
            for daemon in daemons.values():
                daemon.stop()
    report(measured, args.repeat)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
