"""Memory plan: estimate what `count` workers need and compare it with what is available.

Available memory is the tighter of the machine's MemAvailable and the headroom of this
process's cgroup (systemd `MemoryMax=`), so capsd refuses to start (exit 78) instead of
being OOM-killed later. Reading never fails: a source that cannot be read gives no limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil

MIB = 2**20

# The constants below are calibrated by bench/memory_calibration.py (a real capsd, workers that
# have decoded 119.99 s segments 4 times, RSS from `capsctl status --json`), with sherpa-onnx
# 2.0.1 on a 2-core x86_64 box, each worker a spawn-started process.

# Python + numpy + structlog + sherpa-onnx/onnxruntime + a few-KB model, loaded, not yet
# decoding: 62 MiB RSS (python 13, numpy +14, sherpa_onnx +8, recognizer +27).
WORKER_BASELINE_BYTES = 64 * MIB
# RSS per byte of model files once loaded: 1.0 (fp32 MatMul, 76 MB) to 1.28 (fp32 attention,
# 77 MB; int8 MatMulInteger measured 1.30). Loading peaks briefly near 1.9, so start workers
# one at a time.
MODEL_FACTOR = 1.3
# 2 intra-op threads instead of 1 made no difference above the 10 MiB noise between runs.
THREAD_BYTES = 2 * MIB
# onnxruntime's arena keeps the peak of the longest segment decoded (pitfalls.md item 10), and
# glibc's heap creeps up over the first few long decodes. Per second of the longest segment,
# after 4 decodes of 120 s: 2.1 MiB/s on an attention stand-in shaped like Paraformer-large's
# encoder (6 layers of d 512, 4 heads, FFN 2048: its T x T scores are what grow; planned at
# 1.02-1.12x), 1.35 on a 4096-wide MatMul chain, 1.0 on the heavy self-test model and 0.5 on
# the embedded one. Real models have attention, so the self-test models are planned 2-3x high.
SEGMENT_BYTES_PER_S = int(2.5 * MIB)
# The supervisor and multiprocessing's resource tracker: 40 + 12 MiB idle, 81 MiB after one
# client's 120 s file, 110-142 MiB after 2 such clients at once, 152-180 MiB after 3 (client
# frames and queued segments live here). Planned for a few long file clients at once; the
# per-connection bounds in supervisor/front.py keep one client from growing it without limit.
SUPERVISOR_BYTES = 128 * MIB

# cgroup v1 writes "no limit" as a page-rounded LONG_MAX (9223372036854771712).
_V1_UNLIMITED = 2**62


@dataclass(frozen=True)
class Available:
    """Memory capsd may use, and where the figure comes from."""

    bytes: int
    limit: Literal["machine", "cgroup"]
    detail: str  # e.g. "cgroup limit 1.5 GiB minus 600 MiB in use"


@dataclass(frozen=True)
class Plan:
    count: int
    worker_bytes: int
    supervisor_bytes: int
    total_bytes: int
    available_bytes: int  # after the reserve
    reserve_bytes: int
    source: Available
    fits: bool
    max_count: int  # the largest worker count that fits; 0 if not even one

    def message(self) -> str:
        """One line for an operator."""
        sums = (
            f"{_workers(self.count)} x {format_bytes(self.worker_bytes)}"
            f" + supervisor {format_bytes(self.supervisor_bytes)}"
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
            f" set [workers] count = {self.max_count}"
            if self.max_count
            else "not even 1 worker fits; free memory, raise the limit, lower memory_reserve_mb or use a smaller model"
        )
        return f"memory plan does not fit: {sums}, available {format_bytes(self.available_bytes)} ({where}); {advice}"


def estimate_worker_bytes(model_bytes: int, threads: int, longest_segment_s: float) -> int:
    """Steady-state RSS of one worker that has decoded a segment of `longest_segment_s`."""
    return int(
        WORKER_BASELINE_BYTES
        + model_bytes * MODEL_FACTOR
        + threads * THREAD_BYTES
        + longest_segment_s * SEGMENT_BYTES_PER_S
    )


def plan(
    count: int,
    worker_bytes: int,
    available: Available,
    reserve_bytes: int,
    supervisor_bytes: int = SUPERVISOR_BYTES,
) -> Plan:
    usable = max(0, available.bytes - reserve_bytes)
    total = count * worker_bytes + supervisor_bytes
    return Plan(
        count=count,
        worker_bytes=worker_bytes,
        supervisor_bytes=supervisor_bytes,
        total_bytes=total,
        available_bytes=usable,
        reserve_bytes=reserve_bytes,
        source=available,
        fits=total <= usable,
        max_count=max(0, (usable - supervisor_bytes) // worker_bytes),
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
    return f"{n // MIB} MiB"


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
