"""Restart policy as pure functions of the facts (docs/design.md#failure-semantics): no process,
no clock of its own, no logging. The daemon gathers the facts, asks, and carries out the answer.

- `RestartBudget`: OTP's restart intensity. "May I restart now?" is a function of the restart
  history: no more than `restart_intensity` crashes within `restart_period_s`.
- `exit_action`: what follows a worker's end.
- `LostJobs` and `lost_job_fate`: what becomes of the job a worker took with it
  (docs/design.md#retrying-a-lost-job).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from capsd.worker.messages import WorkerSpec

# This many distinct jobs lost to crashed or hung workers within restart_period_s: the machine,
# not a job, is at fault, and lost jobs are not retried until that window clears.
RETRY_PAUSE_JOBS = 3


def model_key(spec: WorkerSpec) -> tuple[object, ...]:
    """Workers alike in memory: the same model files, punctuation and threads."""
    return spec.model_type, tuple(sorted(spec.files.items())), spec.punctuation, spec.threads


@dataclass
class RestartBudget:
    """The crashes within the last restart period (time.monotonic() of each)."""

    crashes: deque[float] = field(default_factory=deque)

    def spend(self, now: float, intensity: int, period_s: float) -> bool:
        """Count a crash at `now`: whether the pool may go on restarting (False: more than
        `intensity` crashes within `period_s`, the machine is at fault: give up)."""
        self.crashes.append(now)
        while self.crashes and self.crashes[0] < now - period_s:
            self.crashes.popleft()
        return len(self.crashes) <= intensity


class ExitAction(Enum):
    """What the daemon does when a slot's worker has ended."""

    LET_GO = "let go"  # the slot was scaled away: its worker is not replaced
    ROLL_BACK = "roll back"  # it died loading a new model: the slot goes back to the running one
    STARTUP_FAILED = "startup failed"  # no worker of the slot was ever ready: not started again
    RESTART = "restart"  # counted in status (and, if it crashed, against the budget), replaced


def exit_action(retiring: bool, loading_new_model: bool, ever_ready: bool) -> ExitAction:
    """A worker that dies before it is ready has a bad model or environment: restarting it would
    loop forever, so capsd refuses to start, like uvicorn's STARTUP_FAILURE. A new model that
    passed the checks but does not load leaves the slot on the model that does."""
    if retiring:
        return ExitAction.LET_GO
    if loading_new_model:
        return ExitAction.ROLL_BACK
    if not ever_ready:
        return ExitAction.STARTUP_FAILED
    return ExitAction.RESTART


@dataclass
class LostJobs:
    """(when, job) of each job lost to a crashed or hung worker within the restart period."""

    faults: deque[tuple[float, int]] = field(default_factory=deque)

    def add(self, now: float, job: int) -> None:
        self.faults.append((now, job))

    def jobs(self, now: float, period_s: float) -> int:
        """Distinct jobs lost within `period_s` before `now`."""
        while self.faults and self.faults[0][0] < now - period_s:
            self.faults.popleft()
        return len({job for _, job in self.faults})


class Fate(Enum):
    """What becomes of a job whose worker died."""

    FAIL = "fail"  # retry_lost_jobs = 0: its task fails with the exit's code
    POISON = "poison"  # it ended more workers than retry_lost_jobs allows: not run again
    PAUSED = "paused"  # workers keep dying: lost jobs are not retried for now
    RETRY = "retry"  # it runs once more, first, on another slot where there is one


def lost_job_fate(allowed: int, faults: int, fault: bool, paused: Callable[[], bool]) -> Fate:
    """`allowed`: retry_lost_jobs; `faults`: the worker deaths the job may have caused before
    this one; `fault`: whether this death may be its fault (crashed, hung: not capsd's own kill);
    `paused`: whether retries are paused now, asked only of a job that would run again."""
    if not allowed:
        return Fate.FAIL
    if faults + fault > allowed:
        return Fate.POISON
    if paused():
        return Fate.PAUSED
    return Fate.RETRY
