"""The benchmarks' own code, run small: a broken bench should fail here, not after an hour."""

import sys
from pathlib import Path

import pytest

from capsd.models import EMBEDDED_MODEL_DIR

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))

import memory_calibration

pytestmark = pytest.mark.integration


def test_memory_calibration_measures_a_worker_within_its_plan(tmp_path: Path) -> None:
    m = memory_calibration.measure(tmp_path, EMBEDDED_MODEL_DIR, count=1, threads=1, decodes=1, exact=True)
    (worker_est, worker), (supervisor_est, supervisor), (total_est, total) = m["parts"].values()
    assert m["loaded"] < m["now"] <= worker  # the decode grew the worker; the peak is at least now
    assert total == worker + supervisor and total_est == worker_est + supervisor_est
    # The plan's promise for the self-test model: never below the measured peak.
    assert worker <= worker_est and supervisor <= supervisor_est
