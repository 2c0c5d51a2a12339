"""Memory plan: estimate what `count` workers need and compare it with what is available.

Available memory is the tighter of the machine's MemAvailable and the headroom of this
process's cgroup (systemd `MemoryMax=`), so capsd refuses to start (exit 78) instead of
being OOM-killed later. Reading never fails: a source that cannot be read gives no limit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil

MIB = 2**20

# The constants below are calibrated by bench/memory_calibration.py against the peak RSS (VmHWM)
# of a real capsd whose workers decoded a 119.99 s segment 4 times each, 1-3 workers, with
# sherpa-onnx 2.0.1 on a 2-core x86_64 box, each worker a spawn-started process, glibc's mmap
# threshold fixed (hand_back_freed_memory). Figures in README.md, "Memory plan".

# Python + numpy + structlog + sherpa-onnx/onnxruntime + a few-KB model, loaded, not yet
# decoding: 62 MiB (python 13, numpy +14, sherpa_onnx +8, recognizer +27) on the box of the
# first calibration, 68 MiB on a second (numpy 2.4.6, Python 3.11.7) and 73 MiB on a third
# (Python 3.11, a newer numpy), all 2-core x86_64: the baseline differs by up to ~11 MiB between
# machines of the same kind with different numpy/onnxruntime builds, so the plan keeps a margin
# of 3 MiB above the highest seen (the self-test worker's estimate 1.09x its peak on the third).
WORKER_BASELINE_BYTES = 76 * MIB
# RSS per byte of model file once loaded: 1.08 for the heavy self-test model (6.2 MiB of fp32
# MatMul weights), 1.0-1.28 for 76-77 MB fp32 stand-ins, 1.30 for int8 MatMulInteger.
MODEL_FACTOR = 1.3
# 2 intra-op threads instead of 1 made no difference above 0.1 MiB.
THREAD_BYTES = 2 * MIB
# The working memory of a decode grows with the length of the segment, and onnxruntime's arena
# keeps its peak (docs/design.md#the-arena-keeps-its-peak). Two parts, per second of the longest segment:
# - the audio and its features in the worker (pickled, as an array, in sherpa-onnx, fbank and
#   LFR frames): 48 MiB for 120 s with the light self-test model, whose graph is tiny;
SEGMENT_BYTES_PER_S = 0.45 * MIB
# - the model's activations, which scale with its width; the file's size is the proxy capsd
#   has before loading anything. The heavy self-test model (1024 wide, 6.2 MiB) added 30 MiB for
#   120 s, 4.9x its size; planned at 5.5x. File size is only a proxy: an attention model's
#   score matrices grow with the square of the segment's length (sherpa-onnx#1571: GBs for
#   30-60 s inputs), so check a real model with `python -m bench.memory_calibration --model DIR`.
ACTIVATION_PER_MODEL_BYTE_PER_S = 5.5 / 120
# A worker forked from a loader (docs/design.md#workers-forked-from-a-loader) shares the model
# with it: what it holds alone (USS) is the pages it writes, of Python objects it touches and its
# beat thread's stack, plus its decode's working memory (below, as for any worker).
FORKED_WORKER_BASELINE_BYTES = 8 * MIB
# The supervisor and multiprocessing's resource tracker: 66 MiB peak with no traffic, and per
# worker the job in its hands (the longest segment, and its copy pickled for the worker). With
# clients holding all the intake admits (below), the supervisor peaked at 157, 173-175 and
# 190-195 MiB for 1-3 workers (both self-test models; docs/benchmarks.md#memory-calibration):
# 16-20 MiB more per worker, of which 16 are the intake's; planned at 18 + 16.
SUPERVISOR_BASELINE_BYTES = 72 * MIB
SUPERVISOR_BYTES_PER_WORKER_S = 0.15 * MIB
# What clients make the supervisor hold, all connections together, is bounded by the intake
# (docs/design.md#intake): frames being received, audio buffered and queued. Its budget is two of
# the longest frames (one arriving, one being parsed) and per worker what one connection may hold
# waiting (16 MiB: a file client at that bound keeps a worker busy); small frames (dictation) have
# a reserve of their own above it. A frame being parsed is also held as its text and its decoded
# audio for a moment: PARSE_FRAMES of the longest frame.
CLIENT_AUDIO_PER_WORKER_BYTES = 16 * MIB
DICTATION_RESERVE_BYTES = 8 * MIB
PARSE_FRAMES = 2
# The OpenAI-compatible API, when [api] port is not 0 (docs/design.md#the-openai-compatible-api).
# Its decoded audio goes through the intake, counted above; uploads are on disk, not in memory.
# Beside them: aiohttp in the supervisor (10 MiB measured), up to API_DECODES decode processes
# (Python, PyAV and FFmpeg: 49-50 MiB peak on 10 min of MP3 and of WAV, planned at 64), and per
# request in progress what it reads and answers (multipart buffers, the final result parsed and
# rendered: a few MiB for hours of audio), planned at 4 MiB for each of API_MAX_REQUESTS.
API_DECODES = 2
API_MAX_REQUESTS = 16
API_BASELINE_BYTES = 10 * MIB
API_DECODER_BYTES = 64 * MIB
API_REQUEST_BYTES = 4 * MIB

# cgroup v1 writes "no limit" as a page-rounded LONG_MAX (9223372036854771712).
_V1_UNLIMITED = 2**62


@dataclass(frozen=True)
class Available:
    """Memory capsd may use, and where the figure comes from."""

    bytes: int
    limit: Literal["machine", "cgroup"]
    detail: str  # e.g. "cgroup limit 1.5 GiB minus 600 MiB in use"


@dataclass(frozen=True)
class Estimate:
    """One model's planned peaks: a worker's (what it holds alone, if forked from a loader) and
    its loader's (0: its workers are spawned, each loading the model)."""

    worker: int
    loader: int = 0


@dataclass(frozen=True)
class Plan:
    count: int
    worker_bytes: int
    loader_bytes: int  # the loaders', all together (two while a model change rolls)
    supervisor_bytes: int
    total_bytes: int
    available_bytes: int  # after the reserve
    reserve_bytes: int
    source: Available
    fits: bool
    max_count: int  # the largest worker count that fits; 0 if not even one
    client_audio_bytes: int  # the intake's budget, part of supervisor_bytes

    def message(self, fix: str = "") -> str:
        """One line for an operator; `fix`: how to ask for what fits (default: the config key)."""
        sums = (
            f"{_workers(self.count)} x {format_bytes(self.worker_bytes)}"
            + (f" + loader {format_bytes(self.loader_bytes)}" if self.loader_bytes else "")
            + f" + supervisor {format_bytes(self.supervisor_bytes)}"
            f" = {format_bytes(self.total_bytes)}"
        )
        where = f"{self.source.detail}, minus memory_reserve_mb {self.reserve_bytes // MIB}"
        if self.fits:
            return (
                f"memory plan fits: {sums} of {format_bytes(self.available_bytes)} available"
                f" ({where}); at most {_workers(self.max_count)} would fit"
            )
        advice = (
            f"at most {_workers(self.max_count)} {'fits' if self.max_count == 1 else 'fit'};"
            f" {fix or f'set [workers] count = {self.max_count}'}"
            if self.max_count
            else "not even 1 worker fits; free memory, raise the limit, lower memory_reserve_mb or use a smaller model"
        )
        return f"memory plan does not fit: {sums}, available {format_bytes(self.available_bytes)} ({where}); {advice}"


def estimate_worker_bytes(
    model_bytes: int, threads: int, longest_segment_s: float, punctuation_bytes: int = 0, forked: bool = False
) -> int:
    """Peak RSS of one worker that decodes a segment of `longest_segment_s`; `forked`: what a
    worker forked from a loader holds alone (its USS), the model being the loader's.

    `model_bytes` is the recognizer's files; the punctuation model's are loaded too, but it
    reads text, so its working memory does not grow with the audio.
    """
    working = longest_segment_s * (SEGMENT_BYTES_PER_S + model_bytes * ACTIVATION_PER_MODEL_BYTE_PER_S)
    if forked:
        return int(FORKED_WORKER_BASELINE_BYTES + working)
    return int(WORKER_BASELINE_BYTES + (model_bytes + punctuation_bytes) * MODEL_FACTOR + threads * THREAD_BYTES + working)


def client_audio_bytes(count: int, max_frame_bytes: int) -> int:
    """The intake's budget: what clients may make the supervisor hold, besides dictation's reserve."""
    return 2 * max_frame_bytes + count * CLIENT_AUDIO_PER_WORKER_BYTES


def api_bytes() -> int:
    """What the OpenAI-compatible API adds: aiohttp, its decode processes, its requests."""
    return API_BASELINE_BYTES + API_DECODES * API_DECODER_BYTES + API_MAX_REQUESTS * API_REQUEST_BYTES


def estimate_supervisor_bytes(count: int, longest_segment_s: float, max_frame_bytes: int, api: bool = False) -> int:
    """Peak RSS of the supervisor with each of `count` workers busy with a longest segment, and
    clients holding all the intake admits (`max_frame_bytes`: [server] max_message_bytes); with
    `api`, the API's share and its decode processes."""
    clients = client_audio_bytes(count, max_frame_bytes) + DICTATION_RESERVE_BYTES + PARSE_FRAMES * max_frame_bytes
    api_share = api_bytes() if api else 0
    return SUPERVISOR_BASELINE_BYTES + clients + api_share + count * int(longest_segment_s * SUPERVISOR_BYTES_PER_WORKER_S)


def hand_back_freed_memory() -> None:
    """Have glibc return freed blocks over 128 KiB to the system (mallopt M_MMAP_THRESHOLD).

    By default glibc raises that threshold to the largest block freed so far (up to 32 MiB),
    so every long client frame and decode afterwards is carved from a heap that keeps it:
    the supervisor stayed near 175 MiB after a load instead of 58, and a worker crept up
    40-60 MiB over its first long decodes (bench/memory_calibration.py). Called by the
    supervisor and each worker at start; a libc without mallopt is left as it is.
    """
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 128 * 1024)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def plan(
    count: int,
    worker_bytes: int,
    available: Available,
    reserve_bytes: int,
    longest_segment_s: float,
    max_frame_bytes: int,
    loader_bytes: int = 0,
    api: bool = False,
) -> Plan:
    """`count` workers of `worker_bytes` each, the loaders they are forked from (`loader_bytes`
    in all, 0 if spawned) and the supervisor (with the API's share if `api`), against what is
    available less the reserve."""
    usable = max(0, available.bytes - reserve_bytes)
    supervisor = estimate_supervisor_bytes(count, longest_segment_s, max_frame_bytes, api)
    total = count * worker_bytes + loader_bytes + supervisor
    # The supervisor's estimate is affine in the count, so the largest count that fits is exact.
    fixed = estimate_supervisor_bytes(0, longest_segment_s, max_frame_bytes, api)
    per_worker = worker_bytes + estimate_supervisor_bytes(1, longest_segment_s, max_frame_bytes, api) - fixed
    return Plan(
        count=count,
        worker_bytes=worker_bytes,
        loader_bytes=loader_bytes,
        supervisor_bytes=supervisor,
        total_bytes=total,
        available_bytes=usable,
        reserve_bytes=reserve_bytes,
        source=available,
        fits=total <= usable,
        max_count=max(0, (usable - fixed - loader_bytes) // per_worker),
        client_audio_bytes=client_audio_bytes(count, max_frame_bytes),
    )


def read_available(proc_root: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> Available:
    """The tighter of the machine's MemAvailable and this process's cgroup headroom."""
    machine = _read_meminfo_available(proc_root / "meminfo")
    if machine is None:
        free = psutil.virtual_memory().available
        best = Available(free, "machine", f"psutil available {format_bytes(free)}")
    else:
        best = Available(machine, "machine", f"MemAvailable {format_bytes(machine)}")
    for cgroup in _cgroup_limits(proc_root / "self" / "cgroup", cgroup_root):
        if cgroup.bytes < best.bytes:
            best = cgroup
    return best


def format_bytes(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{round(n / MIB)} MiB"


def _workers(n: int) -> str:
    return f"{n} worker" if n == 1 else f"{n} workers"


def _read_meminfo_available(path: Path) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the kernel's "kB" is KiB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_limits(self_cgroup: Path, cgroup_root: Path) -> list[Available]:
    """Headroom of every limited cgroup this process sits in, v2 and v1 (hybrid has both)."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except (OSError, ValueError):
        return []
    found = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            limit = _tightest(cgroup_root, path, "memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            limit = _tightest(cgroup_root / "memory", path, "memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        if limit is not None:
            found.append(limit)
    return found


def _read_int(path: Path) -> int | None:
    """An integer file; None when missing, unreadable, "max" or garbage."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _tightest(mount: Path, path: str, max_file: str, usage_file: str) -> Available | None:
    """Smallest headroom over the cgroup and its ancestors: a parent's limit binds too.

    Walking up also finds the limit in a container whose mount root is its own cgroup
    while /proc/self/cgroup still shows the host's path.
    """
    parts = [p for p in path.strip().split("/") if p]
    best = None
    for depth in range(len(parts), -1, -1):
        rel = "/" + "/".join(parts[:depth])
        directory = mount.joinpath(*parts[:depth])
        limit = _read_int(directory / max_file)
        if limit is None or limit >= _V1_UNLIMITED:
            continue
        used = _read_int(directory / usage_file) or 0  # unknown usage: the limit still binds
        headroom = max(0, limit - used)
        if best is None or headroom < best.bytes:
            detail = f"cgroup {rel} limit {format_bytes(limit)} minus {format_bytes(used)} in use"
            best = Available(headroom, "cgroup", detail)
    return best
