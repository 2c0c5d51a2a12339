#!/usr/bin/env python3
"""A long recording stays whole: hours of audio sent to a real capsd as CapsWriter's file client sends it.

CapsWriter users report that 4-11 hour files crash their server. This sends one recording of
--hours hours (default 4) as the file client does: 60 s frames, seg_duration 25, seg_overlap 2,
is_final on the last frame (which carries audio), reading the results while it sends. The audio
is tone-coded random digits (capsd.selftest.tones.synth), made one 60 s frame at a time (4 hours
are 230 M samples, 920 MB of float32: never held at once); only the digits and the tones' start
times are kept. Reported: whether the final frame arrived (within --timeout s of the last frame
sent), whether it is exact (tests/support/checks.assert_exact: the tokens are the digits sent,
timestamps within 0.1 s, partials growing), the wall time from the first frame sent to the final
frame, audio seconds per wall second, the client's own CPU, and memory: the supervisor's RSS when
ready and its peak (VmHWM), each worker's peak. PASS when the final frame arrived and is exact.

Not part of the test run: `python -m bench.long_recording` (the embedded self-test model,
2 workers); `--heavy` for the heavy self-test model's decode cost (a real Paraformer's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.common import SLOT_S, conclude, machine, rss, start_capsd
from capsd.models import EMBEDDED_MODEL_DIR
from capsd.protocol import FILE_FRAME_S, FILE_SEG, RATE, client_frame
from capsd.selftest.build import build_paraformer
from capsd.selftest.tones import synth
from tests.support.checks import assert_exact
from tests.support.client import connect

MIB = 2**20
DIGITS_PER_FRAME = round(FILE_FRAME_S / SLOT_S)  # 120 slots of 0.5 s: a frame ends in a tone's gap


def frame_count(hours: float) -> int:
    return max(1, round(hours * 3600 / FILE_FRAME_S))


def recording(hours: float, seed: int) -> Iterator[tuple[np.ndarray, str, list[float]]]:
    """The recording's 60 s frames, one at a time, each with its digits and their start times in
    the recording. synth renders a frame's 120 digits after 0.2 s of silence, which is 60.2 s: the
    last 0.2 s is the silent end of the last tone's gap, cut, as the next frame starts with 0.2 s
    of silence. So a recording of n frames is exactly n minutes, its tones every 0.5 s from 0.2 s."""
    rng = np.random.default_rng(seed)
    frame_samples = round(FILE_FRAME_S * RATE)
    for n in range(frame_count(hours)):
        digits = "".join(map(str, rng.integers(0, 10, DIGITS_PER_FRAME)))
        samples, starts = synth(digits)
        yield samples[:frame_samples], digits, [n * FILE_FRAME_S + start for start in starts]


async def transcribe(url: str, hours: float, seed: int, timeout: float) -> dict[str, Any]:
    """Send the recording while reading its results; what came back and when."""
    task_id, digits, starts = f"long-{hours:g}h", [], []
    partials: list[int] = []  # tokens in each partial frame (they grow), not the frames: they are large
    finals: list[dict[str, Any]] = []

    async def read(ws: Any) -> None:
        async for raw in ws:
            message = json.loads(raw)
            if message["is_final"]:
                finals.append(message)
                return
            partials.append(len(message["tokens"]))

    async with connect(url) as ws:
        reader = asyncio.create_task(read(ws))
        began = time.perf_counter()
        count = frame_count(hours)
        for n, (samples, frame_digits, frame_starts) in enumerate(recording(hours, seed)):
            digits.append(frame_digits)
            starts += frame_starts
            await ws.send(client_frame(task_id, samples, n == count - 1, "file", FILE_SEG))
        sent = time.perf_counter()
        try:
            await asyncio.wait_for(reader, timeout)
        except asyncio.TimeoutError:
            pass
        ended = time.perf_counter()
    return {"digits": "".join(digits), "starts": starts, "partials": partials, "finals": finals,
            "wall": ended - began, "sending": sent - began}  # fmt: skip


def exactness(got: dict[str, Any], timeout: float) -> str | None:
    """What is wrong with the result, if anything (checked as tests/support/checks.assert_exact does)."""
    if not got["finals"]:
        return f"no final frame within {timeout:g} s of the last frame sent"
    stubs = [{"is_final": False, "tokens": range(n)} for n in got["partials"]]  # assert_exact reads their lengths
    try:
        assert_exact([*stubs, got["finals"][0]], got["digits"], got["starts"])
    except AssertionError as e:
        return f"not exact: {str(e)[:300] or 'assert_exact failed'}"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=4, help="length of the recording (default 4)")
    parser.add_argument("--workers", type=int, default=2, help="worker slots (default 2)")
    parser.add_argument("--heavy", action="store_true", help="the heavy self-test model (a real Paraformer's cost)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the digits (default 0)")
    parser.add_argument("--timeout", type=float, default=1800, help="for the final frame after the last frame sent")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    tmp = Path(tempfile.mkdtemp(prefix="capsd-long-"))
    model = tmp / "heavy" if args.heavy else EMBEDDED_MODEL_DIR
    if args.heavy:
        build_paraformer(model, heavy=True)
    capsd, _ = start_capsd(tmp, model, args.workers, threads=1)
    try:
        ready_rss = psutil.Process(capsd.proc.pid).memory_info().rss
        client_cpu = time.process_time()
        got = asyncio.run(transcribe(capsd.url, args.hours, args.seed, args.timeout))
        client_cpu = time.process_time() - client_cpu
        supervisor_peak, worker_peaks = capsd.peak_rss(), rss(capsd, peak=True)[1]
    finally:
        exitcode = capsd.stop()
    audio_s = args.hours * 3600
    problem = exactness(got, args.timeout)
    problems = [problem] if problem else []
    if exitcode:
        problems.append(f"capsd exited {exitcode} on SIGTERM")
    print(
        f"long recording: {args.hours:g} h ({audio_s:.0f} s, {len(got['digits'])} digits) in 60 s frames,"
        f" seg_duration 25, seg_overlap 2; {'heavy' if args.heavy else 'embedded self-test'} model,"
        f" {args.workers} workers"
    )
    print(
        f"  final frame: {'arrived' if got['finals'] else 'missing'}, {'exact' if not problem else 'NOT exact'};"
        f" {len(got['partials'])} partial frames before it"
    )
    print(
        f"  wall {got['wall']:.1f} s from the first frame sent to the final frame (sending took {got['sending']:.1f} s);"
        f" {audio_s / got['wall']:.0f} s of audio per wall second; the client (synthesis, encoding, parsing) used"
        f" {client_cpu:.0f} s of CPU"
    )
    print(
        f"  supervisor RSS {ready_rss / MIB:.1f} MiB when ready, peak {supervisor_peak / MIB:.1f} MiB;"
        f" worker peaks {' '.join(f'{peak / MIB:.1f}' for peak in worker_peaks)} MiB"
    )
    return conclude("long recording", problems, capsd.log_path, tmp)


if __name__ == "__main__":
    raise SystemExit(main())
