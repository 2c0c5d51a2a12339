"""The supervisor's decisions, in-process: restart policy as pure functions, and a `Daemon`
whose slots run fake workers (no subprocess, no socket), so each decision is checked without
timing: what follows a worker's end, the restart budget, a lost job retried, the pool reaching
the shape it is asked for, and each slot's state as it goes."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import pytest

from capsd import config, preflight
from capsd.control_protocol import ControlError
from capsd.protocol import ErrorCode
from capsd.segment import Segmenter
from capsd.supervisor.daemon import Daemon
from capsd.supervisor.policy import (
    RETRY_PAUSE_JOBS,
    ExitAction,
    Fate,
    LostJobs,
    RestartBudget,
    exit_action,
    lost_job_fate,
)
from capsd.supervisor.pool import Shape
from capsd.supervisor.slot import _GONE, Slot, SlotState
from capsd.supervisor.task import Task
from capsd.worker.messages import Decode, Decoded, Format, Formatted, Stop, WorkerSpec
from tests.support.fakes import Client, FakeIncarnation, segment

pytestmark = pytest.mark.unit


# -- restart policy: pure functions of the facts ----------------------------------------------


def test_the_restart_budget_allows_intensity_crashes_within_the_period_and_forgets_older_ones() -> None:
    budget = RestartBudget()
    assert [budget.spend(t, intensity=2, period_s=10.0) for t in (0.0, 1.0)] == [True, True]
    assert budget.spend(2.0, intensity=2, period_s=10.0) is False  # a third within 10 s
    assert budget.spend(30.0, intensity=2, period_s=10.0) is True  # the window has cleared
    assert list(budget.crashes) == [30.0]


def test_restart_intensity_zero_gives_up_at_the_first_crash() -> None:
    assert RestartBudget().spend(0.0, intensity=0, period_s=60.0) is False


@pytest.mark.parametrize(
    ("retiring", "loading_new_model", "ever_ready", "action"),
    [
        (True, True, False, ExitAction.LET_GO),  # scaled away: whatever it was doing
        (False, True, True, ExitAction.ROLL_BACK),
        (False, False, False, ExitAction.STARTUP_FAILED),
        (False, False, True, ExitAction.RESTART),
    ],
)
def test_what_follows_a_workers_end_depends_on_why_and_when_it_ended(
    retiring: bool, loading_new_model: bool, ever_ready: bool, action: ExitAction
) -> None:
    assert exit_action(retiring, loading_new_model, ever_ready) is action


def test_a_lost_jobs_fate_depends_on_the_setting_its_crashes_who_killed_it_and_the_pause() -> None:
    never: Callable[[], bool] = lambda: pytest.fail("paused asked of a job that would not run again")  # noqa: E731
    assert lost_job_fate(0, 0, True, never) is Fate.FAIL  # retry_lost_jobs = 0
    assert lost_job_fate(1, 1, True, never) is Fate.POISON  # its second crash
    assert lost_job_fate(1, 1, False, lambda: False) is Fate.RETRY  # capsd's own kill is not its fault
    assert lost_job_fate(1, 0, True, lambda: True) is Fate.PAUSED
    assert lost_job_fate(1, 0, True, lambda: False) is Fate.RETRY


def test_retries_pause_at_distinct_jobs_lost_within_the_period() -> None:
    lost = LostJobs()
    for when, job in [(0.0, 1), (1.0, 1), (2.0, 2)]:
        lost.add(when, job)
    assert lost.jobs(3.0, period_s=60.0) == 2 < RETRY_PAUSE_JOBS  # job 1 twice is one job
    lost.add(4.0, 3)
    assert lost.jobs(5.0, period_s=60.0) == RETRY_PAUSE_JOBS
    assert lost.jobs(61.5, period_s=60.0) == 2  # the first two faults are older than the period


# -- a daemon whose workers are fake ------------------------------------------------------------


class Worker(FakeIncarnation):
    """An incarnation whose worker loads when the test says so (at once by default), answers
    each job with one token, and dies when told to."""

    spawned: ClassVar[list[Worker]] = []
    loads: ClassVar[bool] = True  # whether the next workers load at once

    def __init__(self, index: int, spec: WorkerSpec) -> None:
        super().__init__(spec, 1000 + len(Worker.spawned))
        self.index = index
        self.last_beat, self.aborting, self.over_plan = 0.0, False, False
        Worker.spawned.append(self)
        if Worker.loads:
            self.load()

    def load(self) -> None:
        self.ready = True
        self.loaded.set_result(True)

    async def send(self, job: Decode | Format | Stop) -> None:
        if isinstance(job, Stop):
            self.die(0)
        elif isinstance(job, Decode):
            self.replies.put_nowait(Decoded(job.job, ["一"], [0.5]))
        else:
            self.replies.put_nowait(Formatted(job.job, job.text))

    def die(self, exitcode: int) -> None:
        if self.exited.done():
            return
        self.process.alive = False
        self.replies.put_nowait(_GONE)
        self.exited.set_result(exitcode)
        if not self.loaded.done():
            self.loaded.set_result(False)

    def peak_rss(self) -> int:
        return 0

    def cpu_seconds(self) -> float | None:
        return None


async def settle() -> None:
    """Until every callback and task that can run has run."""
    for _ in range(20):
        await asyncio.sleep(0)


def with_daemon(scenario: Callable[[Daemon], Awaitable[Any]], loads: bool = True, **workers: Any) -> Any:
    """Run `scenario` against a daemon of fake workers, its slots started as `Daemon.run` starts
    them (not its sockets), and ready once they have loaded."""
    cfg = config.from_dict({"workers": {"count": 2, "memory_reserve_mb": 0, "preload": False, **workers}})
    checked = preflight.check(cfg)
    Worker.spawned, Worker.loads = [], loads

    async def run() -> Any:
        daemon = Daemon(cfg, checked, lambda: cfg, spawn=Worker)  # type: ignore[arg-type]
        for slot in daemon.slots:
            daemon.start_worker(slot)
        await settle()
        if all(slot.state is SlotState.READY for slot in daemon.slots):
            daemon.state = "ready"
        try:
            return await scenario(daemon)
        finally:
            daemon.cancel_runners()

    return asyncio.run(asyncio.wait_for(run(), 10))


def worker_of(slot: Slot) -> Worker:
    assert slot.incarnation is not None
    return slot.incarnation  # type: ignore[return-value]


def test_a_crashed_worker_is_replaced_and_counted() -> None:
    async def scenario(daemon: Daemon) -> tuple[Any, ...]:
        slot = daemon.slots[0]
        first = worker_of(slot)
        first.die(-9)
        await settle()
        return slot.state, slot.restarts, slot.last_exit, worker_of(slot) is not first, daemon.done.done()

    state, restarts, last_exit, replaced, gave_up = with_daemon(scenario)
    assert state is SlotState.READY and restarts == 1 and replaced and not gave_up
    assert (last_exit.reason, last_exit.exitcode) == ("crashed", -9)


def test_more_crashes_than_restart_intensity_within_the_period_give_up() -> None:
    async def scenario(daemon: Daemon) -> int:
        for _ in range(3):
            worker_of(daemon.slots[0]).die(-9)
            await settle()
        return await daemon.done

    assert with_daemon(scenario, restart_intensity=2) == os.EX_SOFTWARE


def test_a_worker_that_dies_loading_at_start_refuses_the_start() -> None:
    async def scenario(daemon: Daemon) -> tuple[list[SlotState], int, int]:
        states = [slot.state for slot in daemon.slots]
        worker_of(daemon.slots[1]).die(255)  # sherpa-onnx's _Exit(255) on a bad model
        await settle()
        return [*states, daemon.slots[1].state], await daemon.done, len(Worker.spawned)

    states, code, spawned = with_daemon(scenario, loads=False)
    assert states == [SlotState.STARTING, SlotState.STARTING, SlotState.FAILED]
    assert code == os.EX_CONFIG and spawned == 2  # not started again


def test_a_job_lost_with_its_worker_runs_once_more_on_another_slot() -> None:
    async def scenario(daemon: Daemon) -> tuple[Client, int]:
        client = Client()
        slot = daemon.slots[0]
        task = Task("t", "file", 0.0, slot, Segmenter(15, 2), client)
        slot.accept(task)
        worker = worker_of(slot)

        async def never_answers(job: Any) -> None:
            await asyncio.shield(worker.exited)

        worker.send = never_answers  # type: ignore[method-assign]
        task.submit(segment(0, last=True))
        await settle()
        worker.die(-9)  # ... and dies with the job
        await settle()
        return client, daemon.retried

    client, retried = with_daemon(scenario, retry_lost_jobs=1)
    assert retried == 1
    assert [f["is_final"] for f in client.frames] == [True] and "error" not in client.frames[0]


def test_scale_only_changes_the_wanted_count_and_the_reconcile_reaches_it() -> None:
    async def scenario(daemon: Daemon) -> list[Any]:
        grown = await daemon.scale(3)
        seen = [grown["count"], daemon.count, [slot.state for slot in daemon.slots], daemon.wanted.count]
        shrunk = await daemon.scale(1)
        going = [slot.state for slot in daemon.slots]
        daemon.watch_slots(0.0)  # they home no task: they go at the watch loop's next round
        seen += [shrunk["before"], daemon.count, going, [slot.state for slot in daemon.slots]]
        return seen

    grown, count, states, wanted, before, count_after, going, states_after = with_daemon(scenario)
    assert grown == count == wanted == 3 and states == [SlotState.READY] * 3
    assert before == 3 and count_after == 1
    assert going == [SlotState.READY, SlotState.RETIRING, SlotState.RETIRING] and states_after == [SlotState.READY]


def test_a_shrunk_slot_retires_until_its_last_task_ends_and_shows_as_draining() -> None:
    async def scenario(daemon: Daemon) -> tuple[str, SlotState, int]:
        slot = daemon.slots[1]
        task = Task("t", "file", 0.0, slot, Segmenter(15, 2), Client())
        slot.accept(task)
        await daemon.scale(1)
        shown, state = slot.status()["state"], slot.state
        daemon.watch_slots(0.0)
        kept = len(daemon.slots)
        task.fail(ErrorCode.SHUTTING_DOWN, "capsd is stopping")
        daemon.watch_slots(0.0)
        return shown, state, kept * 10 + len(daemon.slots)

    shown, state, slots = with_daemon(scenario)
    assert (shown, state, slots) == ("draining", SlotState.RETIRING, 21)  # 2 while its task runs, then 1


def test_a_grow_whose_new_worker_does_not_load_is_refused_and_the_wish_given_up() -> None:
    async def scenario(daemon: Daemon) -> tuple[str, int, Shape, int]:
        Worker.loads = False
        asking = asyncio.ensure_future(daemon.scale(3))
        await settle()
        Worker.spawned[-1].die(255)
        with pytest.raises(ControlError) as refused:
            await asking
        await settle()
        daemon.watch_slots(0.0)
        return str(refused.value), daemon.count, daemon.wanted, len(daemon.slots)

    message, count, wanted, slots = with_daemon(scenario)
    assert "the worker of slot 2 did not load; the pool keeps 2 slots" in message
    assert count == wanted.count == 2 and slots == 2


def test_each_state_change_is_logged_once_with_its_reason() -> None:
    from structlog.testing import capture_logs

    async def scenario(daemon: Daemon) -> list[dict[str, Any]]:
        with capture_logs() as logs:
            worker_of(daemon.slots[0]).die(-9)
            await settle()
        return [e for e in logs if e["event"] == "slot state"]

    changes = with_daemon(scenario)
    assert [(e["slot"], e["before"], e["after"]) for e in changes] == [
        (0, "ready", "restarting"),
        (0, "restarting", "ready"),
    ]
    assert changes[0]["why"] == "worker exited: crashed"


def test_a_reload_during_a_capsctl_scale_leaves_its_count_alone_and_a_later_wish_wins() -> None:
    """A reload whose [workers] count is the running one (say, a new log level) does not undo a
    capsctl scale under way; one that asks for another count is reached once the scale ends."""
    import structlog

    saved = structlog.get_config()

    async def scenario(daemon: Daemon) -> list[int]:
        Worker.loads = False
        asking = asyncio.ensure_future(daemon.scale(3))
        await settle()
        daemon.handle_sighup()  # the file still says 2
        Worker.spawned[-1].load()
        grown = (await asking)["count"]
        await settle()
        counts = [grown, daemon.count]
        daemon.reload = lambda: config.from_dict({"workers": {"count": 1, "memory_reserve_mb": 0}})
        daemon.handle_sighup()
        assert daemon.reconciling is not None
        await daemon.reconciling
        return [*counts, daemon.count, daemon.wanted.count]

    try:
        assert with_daemon(scenario) == [3, 3, 1, 1]
    finally:
        structlog.configure(**saved)
