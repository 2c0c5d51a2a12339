#!/usr/bin/env python3
"""Memory plan against measured RSS: calibrates the constants in capsd/memory.py.

For the self-test model and the CPU-heavy one, a real capsd with 1, 2 and 3 workers (and 1
worker with 2 threads) is sent, on every slot at once, a task cut into one segment of the
longest length the contract allows: seg_duration 60, seg_overlap 59.99, so 119.99 s, against
LONGEST_SEGMENT_S = 120 in the plan (onnxruntime's arena keeps the peak of the longest input,
pitfalls.md item 10). This is repeated --decodes times, since the RSS of a worker still creeps up
over the first few long decodes. Then worker RSS comes from `capsctl status --json`
(rss_bytes), and the supervisor's is that of the daemon's own process plus its children that are
not workers (multiprocessing's resource tracker), via psutil.

Printed: capsd's own estimate (its plan at startup) against the measured RSS, per worker (the
largest worker), for the supervisor, and in total, and the ratio estimate / measured, which
should stay in 1.0..1.3. RSS counts shared library pages in every process, so the measured total
is an upper bound of what the cgroup is charged.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from common import check_exact, file_frames, machine, models, rss, task_ids, tone_file, transcribe

from capsd import memory
from capsd.preflight import LONGEST_SEGMENT_S
from capsd.selftest.daemon import Capsd

MIB = 2**20
LONGEST_SEG = (60.0, 59.99)  # seg_duration <= 60, seg_overlap < seg_duration (CONTRACT.md section 3)
LOW, HIGH = 1.0, 1.3


def measure(tmp: Path, model_dir: Path, count: int, threads: int, decodes: int, exact: bool) -> dict[str, Any]:
    """Start capsd, decode the longest segment `decodes` times on every slot, read RSS and the plan."""
    seconds = sum(LONGEST_SEG)
    config = {"workers": {"count": count, "threads": threads}, "model": {"dir": str(model_dir)}}
    capsd = Capsd(tmp, config)
    try:
        for n in range(decodes):
            tasks = {}
            for slot, task_id in enumerate(task_ids(list(range(count)), count)):
                samples, digits = tone_file(seconds, seed=100 * n + slot)
                tasks[task_id] = (file_frames(task_id, samples, LONGEST_SEG), digits)
            _, finals = transcribe(capsd.url, {t: frames for t, (frames, _) in tasks.items()})
            for task_id, (_, digits) in tasks.items():
                if exact:
                    check_exact(finals[task_id], digits)
        status = capsd.status()
        supervisor, workers = rss(capsd)
    finally:
        capsd.stop()
    planned = status["memory"]["planned_bytes"]
    return {
        "worker": max(workers),
        "supervisor": supervisor,
        "total": sum(workers.values()) + supervisor,
        "est_worker": (planned - memory.SUPERVISOR_BYTES) // count,
        "est_total": planned,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decodes", type=int, default=4, help="longest segments decoded per worker (default 4)")
    parser.add_argument(
        "--model", type=Path, action="append", default=[], metavar="DIR",
        help="also measure this paraformer model directory, e.g. a real release (its text is not checked)",
    )  # fmt: skip
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(
        f"each worker decoded a {sum(LONGEST_SEG):g} s segment {args.decodes} times (seg {LONGEST_SEG[0]:g}/"
        f"{LONGEST_SEG[1]:g}); plan uses LONGEST_SEGMENT_S = {LONGEST_SEGMENT_S:g}; RSS in MiB\n"
    )
    print(f"{'model':<12} {'workers':>7} {'threads':>7} | {'per worker: est':>15} {'measured':>8} {'ratio':>5}"
          f" | {'supervisor: est':>15} {'measured':>8} | {'total: est':>10} {'measured':>8} {'ratio':>5}")  # fmt: skip
    below: list[str] = []
    above: list[str] = []
    with tempfile.TemporaryDirectory(prefix="capsd-memory-") as tmp:
        own = models(Path(tmp))
        for name, model_dir in {**own, **{d.name: d for d in args.model}}.items():
            for count, threads in ((1, 1), (2, 1), (3, 1), (1, 2)):
                run = Path(tmp) / f"{name}-{count}-{threads}"
                run.mkdir()
                m = measure(run, model_dir, count, threads, args.decodes, exact=name in own)
                ratios = m["est_worker"] / m["worker"], m["est_total"] / m["total"]
                row = f"{name} {count}x{threads}"
                below += [row] if min(ratios) < LOW else []
                above += [row] if max(ratios) > HIGH else []
                print(
                    f"{name[:12]:<12} {count:>7} {threads:>7} | {m['est_worker'] / MIB:>15.1f} {m['worker'] / MIB:>8.1f}"
                    f" {ratios[0]:>5.2f} | {memory.SUPERVISOR_BYTES / MIB:>15.1f} {m['supervisor'] / MIB:>8.1f}"
                    f" | {m['est_total'] / MIB:>10.1f} {m['total'] / MIB:>8.1f} {ratios[1]:>5.2f}",
                    flush=True,
                )
    print(f"\nnever below measured ({LOW}x): " + (", ".join(below) + " BELOW" if below else "met in every row"))
    print(f"at most {HIGH}x measured: " + (", ".join(above) + " ABOVE" if above else "met in every row"))


if __name__ == "__main__":
    main()
