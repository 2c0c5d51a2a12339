"""The benchmarks' own code, run small: a broken bench should fail here, not after an hour."""

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import chaos, hostile, long_recording, memory_calibration, throughput
from capsd.models import EMBEDDED_MODEL_DIR
from capsd.protocol import RATE
from capsd.selftest.tones import synth


@pytest.mark.integration
@pytest.mark.parametrize("preload", [True, False], ids=["forked", "spawned"])
def test_memory_calibration_measures_a_worker_within_its_plan(tmp_path: Path, preload: bool) -> None:
    m = memory_calibration.measure(tmp_path, EMBEDDED_MODEL_DIR, 1, 1, decodes=1, exact=True, preload=preload)
    (worker_est, worker), (loader_est, loader), (supervisor_est, supervisor), (total_est, total) = m["parts"].values()
    assert m["forked"] == preload and (loader_est > 0) == (loader > 0) == preload
    assert m["loaded"] < m["now"] <= worker  # the decode grew the worker; the peak is at least now
    assert total_est == worker_est + loader_est + supervisor_est
    # The plan's promise for the self-test model: never below the measured peak, nor the sum of PSS.
    assert worker <= worker_est and loader <= loader_est and supervisor <= supervisor_est
    assert 0 < total <= total_est


@pytest.mark.unit
def test_long_recording_is_made_frame_by_frame_as_one_recording() -> None:
    frames = list(long_recording.recording(3 / 60, seed=1))  # 3 minutes
    samples = np.concatenate([frame for frame, _, _ in frames])
    digits = "".join(d for _, d, _ in frames)
    whole, starts = synth(digits)
    assert [len(frame) for frame, _, _ in frames] == [60 * RATE] * 3 and len(digits) == 360
    assert np.array_equal(samples, whole[: len(samples)])  # only silence cut: the last gap's end
    assert [s for _, _, frame_starts in frames for s in frame_starts] == starts


@pytest.mark.integration
def test_long_recording_comes_back_exact(tmp_path: Path, start_capsd: Any) -> None:
    capsd = start_capsd({"workers": {"count": 1}})
    got = asyncio.run(long_recording.transcribe(capsd.url, 3 / 60, seed=2, timeout=60))
    assert long_recording.exactness(got, 60) is None
    assert got["partials"]  # the results were read while the audio was sent


@pytest.mark.integration
def test_hostile_rows_abuse_dictate_on_every_slot_and_measure(start_capsd: Any) -> None:
    """The rows after the abuses, a few seconds each and with two floods for many."""
    capsd = start_capsd({"workers": {"count": 2}})
    rows = [hostile.Row("endless", hostile.one_endless_task, 1, 6), hostile.Row("many2", hostile.many, 2, 6)]
    for row in rows:
        hostile.run_row(capsd, 2, row)
        hostile.judge(row, 2, budget=2**40, bound=60)  # its summary, printed; load on the machine may slow it
        assert row.good.exact and not row.good.failed
        assert {slot for _, slot, _ in row.good.latencies} == {0, 1}
        assert row.peak > 0
    assert rows[0].sent[-1][1] > 60 and rows[1].counts["60 s frames sent"] >= 2


@pytest.mark.unit
def test_chaos_reads_each_capsd_log() -> None:
    log = chaos.parse_log(
        "2026-12-02T16:40:10.283257 [warning  ] worker exited                  exitcode=-9 lost_tasks=['c2-8']"
        " pid=7544 reason=crashed slot=1\n"
        "2026-12-02T16:40:10.283435 [warning  ] task failed                    code=worker_crashed"
        " reason='the worker of slot 1 ended (crashed, exit code -9)' slot=0 task=c2-8\n"
        "2026-12-02T16:40:14.716804 [warning  ] worker exited                  exitcode=-9 lost_tasks=[] pid=8282"
        " reason=crashed slot=1\n"
        "2026-12-02T16:45:56.007988 [warning  ] task refused                   code=shutting_down"
        " reason='capsd is stopping' slot=0 task=c1-5\n"
        "2026-12-02T16:45:56.507988 [info     ] job retried                    job=12 reason=crashed slot=0 task=c2-9\n"
        "2026-12-02T16:45:57.007988 [error    ] poison job: not run again      audio_s=27.0 task='c 3'\n"
        "2026-12-02T16:45:55.919406 [critical ] slot dispatcher failed         error=\"RuntimeError('x')\"\n"
    )
    assert log.exits == [chaos.WorkerExit(7544, "crashed", "-9", ["c2-8"]), chaos.WorkerExit(8282, "crashed", "-9", [])]
    assert log.failed == {"c2-8", "c1-5"} and log.poison == {"c 3"} and (log.retried, log.paused) == (1, 0)
    assert len(log.critical) == 1 and "slot dispatcher failed" in log.critical[0]


@pytest.mark.integration
def test_throughput_sends_the_same_files_through_the_api_and_the_capswriter_protocol(start_capsd: Any) -> None:
    """(k), one run a side on the self-test model: both sides answered exactly (checked inside)."""
    capsd = start_capsd({"workers": {"count": 2}})
    times = throughput.api_against_protocol(capsd, repeat=1)
    assert len(times["api"]) == len(times["protocol"]) == 1 and min(times["api"] + times["protocol"]) > 0
