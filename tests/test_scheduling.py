"""Scheduling and merging in the supervisor, in-process: pure queues, tasks, and slots fed by a
fake worker (no subprocess), so every decision is checked without timing."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import numpy as np
import pytest

from capsd.segment import Segment, Segmenter
from capsd.supervisor.queue import JobQueue, Waiting, next_job
from capsd.supervisor.slot import _GONE, ExitReason, Slot, job_deadline
from capsd.supervisor.task import INLINE_FINAL_TOKENS, MAX_TASK_S, PARTIAL_INTERVAL_S, Task
from capsd.worker.messages import Decode, Decoded, Format, Formatted, Stop, WorkerSpec
from tests.support.fakes import Client, FakeIncarnation, segment

pytestmark = pytest.mark.unit


def make_task(slot: Any, client: Client, task_id: str = "t", source: str = "file") -> Task:
    return Task(task_id, source, 0.0, slot, Segmenter(15, 2), client)


# -- the queue and the choice of the next job ---------------------------------------------------


class HomeSlot:
    """Enough of a slot for tasks that are only queued."""

    index = 0

    def submit(self, task: Task, work: Any) -> None: ...


def waiting(source: str, submitted: float, work: Any = None) -> Waiting:
    return Waiting(make_task(HomeSlot(), Client(), source=source), work if work is not None else segment(0), submitted)


def test_a_slot_takes_its_own_jobs_first_dictation_before_files() -> None:
    own = JobQueue()
    file_job, mic_job = waiting("file", 1.0), waiting("mic", 2.0)
    own.push(file_job)
    own.push(mic_job)
    assert next_job(own, []) == (own, mic_job)
    assert next_job(own, []) == (own, file_job)
    assert next_job(own, []) is None


def test_a_slot_with_nothing_of_its_own_helps_urgent_jobs_first_then_the_oldest_file() -> None:
    own, a, b = JobQueue(), JobQueue(), JobQueue()
    newer, older, text = waiting("file", 5.0), waiting("file", 3.0), waiting("file", 9.0, work="一二")
    a.push(newer)
    b.push(older)
    b.push(text)  # a text to punctuate ends a task: urgent, whatever its source
    assert next_job(own, [a, b]) == (b, text)
    assert next_job(own, [a, b]) == (b, older)
    assert next_job(own, [a, b]) == (a, newer)
    assert next_job(own, [a, b]) is None


def test_a_retried_job_goes_first_on_another_slot_unless_no_other_can_take_it() -> None:
    own, other = JobQueue(), JobQueue()
    me, them = object(), object()
    mic = waiting("mic", 1.0)
    lost_here = dataclasses.replace(waiting("file", 5.0), lost_on=me)
    lost_there = dataclasses.replace(waiting("file", 6.0), lost_on=them)
    own.push(mic)
    own.push(lost_here)
    other.push(lost_there)
    assert next_job(own, [other], me, alone=False) == (other, lost_there)  # before its own dictation
    assert next_job(own, [other], me, alone=False) == (own, mic)  # not the job lost here ...
    assert next_job(own, [other], me, alone=False) is None
    assert next_job(own, [other], me, alone=True) == (own, lost_here)  # ... unless no other slot can
    assert len(own) == len(other) == 0


def test_a_jobs_deadline_grows_with_its_audio_and_never_falls_below_the_heartbeat() -> None:
    assert job_deadline(62.0, 0.5, 30.0) == 62.0 * 0.5 * 4  # a slow model's long segment: 124 s, not 30
    assert job_deadline(62.0, 0.05, 30.0) == 30.0
    assert job_deadline(0.0, 0.0, 30.0) == 30.0  # a text to punctuate


def test_dropping_a_task_leaves_the_others_in_order() -> None:
    queue = JobQueue()
    items = [waiting("file", float(i)) for i in range(4)]
    for item in items:
        queue.push(item)
    assert queue.drop(items[1].task) == [items[1]]
    assert list(queue) == [items[0], items[2], items[3]]


# -- a task merges segments in order, whatever order they come back in ------------------------


def test_segments_decoded_out_of_order_give_partial_frames_in_order_and_one_final() -> None:
    client = Client()
    task = make_task(HomeSlot(), client)
    task.slot.finished = lambda task, failed: None  # type: ignore[attr-defined]
    segments = [segment(0), segment(1), segment(2, last=True)]
    task.segment_decoded(segments[2], ["三"], [0.5], 3.0)
    task.segment_decoded(segments[1], ["二"], [0.5], 2.0)
    assert client.frames == []  # both wait for segment 0
    task.segment_decoded(segments[0], ["一"], [0.5], 1.0)
    assert [f["is_final"] for f in client.frames] == [True]  # all three merged at once: the final
    assert client.frames[-1]["tokens"] == ["1", "2", "3"]  # 一二三, formatted
    assert client.frames[-1]["timestamps"] == [0.5, 2.5, 4.5]


def test_partial_frames_grow_as_the_merged_prefix_grows() -> None:
    client = Client()
    task = make_task(HomeSlot(), client)
    task.slot.finished = lambda task, failed: None  # type: ignore[attr-defined]
    task.segment_decoded(segment(1), ["二"], [0.5], 2.0)
    task.segment_decoded(segment(0), ["一"], [0.5], 1.0)
    task.segment_decoded(segment(2, last=True), ["一", "二"], [0.1, 0.6], 3.0)
    assert [(f["tokens"], f["is_final"]) for f in client.frames] == [
        (["一", "二"], False),
        (["1", "2", "1", "2"], True),  # formatted: numerals to digits, tokens realigned
    ]
    assert client.frames[-1]["text"] == client.frames[-1]["text_accu"] == "1212"


# -- slots fed by a fake worker -----------------------------------------------------------------


class FakeWorker(FakeIncarnation):
    """An incarnation whose worker answers each job when the test says so."""

    def __init__(self, index: int, spec: WorkerSpec) -> None:
        super().__init__(spec, 100 + index)
        self.ready = True
        self.loaded.set_result(True)
        self.job: Decode | Format | None = None
        self.sent = asyncio.Event()

    async def send(self, job: Decode | Format | Stop) -> None:
        if isinstance(job, Stop):
            self.die(0)
            return
        self.job = job
        self.sent.set()

    async def answer(self, token: str) -> None:
        """Finish the job in hand: a segment decodes to `token`, a text comes back as it is."""
        await self.sent.wait()
        self.sent.clear()
        job, self.job = self.job, None
        self.replies.put_nowait(Decoded(job.job, [token], [0.5]) if isinstance(job, Decode) else Formatted(job.job, job.text))
        await asyncio.sleep(0)

    def die(self, exitcode: int) -> None:
        self.close()
        self.exited.set_result(exitcode)

    def close(self) -> None:
        self.replies.put_nowait(_GONE)


class Pool:
    """Two slots with fake workers, and what the daemon would be told."""

    def __init__(self, stealing: bool) -> None:
        spec = WorkerSpec("paraformer", {}, 1)
        self.exits: list[tuple[int, ExitReason, Waiting | None]] = []
        self.slots: list[Slot] = []
        self.slots += [Slot(i, spec, 100, stealing, self.exited, peers=self.slots, spawn=FakeWorker) for i in range(2)]  # type: ignore[arg-type]
        self.workers = []
        for slot in self.slots:
            slot.start()
            self.workers.append(slot.incarnation)
        self.runners = [asyncio.create_task(slot.run()) for slot in self.slots]

    def exited(self, slot: Slot, reason: ExitReason, exitcode: int | None, lost: Waiting | None) -> None:
        self.exits.append((slot.index, reason, lost))
        if lost:
            lost.task.fail(reason.code, "the worker died")

    async def close(self) -> None:
        for runner in self.runners:
            runner.cancel()
        await asyncio.gather(*self.runners, return_exceptions=True)


def run(scenario: Any) -> Any:
    return asyncio.run(asyncio.wait_for(scenario(), 10))


@pytest.mark.parametrize("stealing", [True, False])
def test_an_idle_slot_decodes_segments_of_a_task_homed_on_a_busy_one(stealing: bool) -> None:
    async def scenario() -> tuple[list[str], Client]:
        pool = Pool(stealing)
        client = Client()
        task = make_task(pool.slots[0], client)
        pool.slots[0].accept(task)
        for i in range(3):
            task.submit(segment(i, last=i == 2))
        await asyncio.sleep(0)
        busy = [worker.job is not None for worker in pool.workers]
        for i, worker in enumerate(pool.workers):
            if worker.job is not None:
                await worker.answer(str(i))
        while not any(f["is_final"] for f in client.frames):
            await pool.workers[0].answer("0")
        await pool.close()
        return [str(b) for b in busy], client

    busy, client = run(scenario)
    assert busy == (["True", "True"] if stealing else ["True", "False"])  # one task, both workers
    assert [f["is_final"] for f in client.frames].count(True) == 1
    assert len(client.frames[-1]["tokens"]) == 3


def test_a_worker_dying_mid_job_fails_exactly_the_task_of_that_job() -> None:
    async def scenario() -> tuple[Pool, Client, Client]:
        pool = Pool(stealing=True)
        home0, home1 = Client(), Client()
        long_task = make_task(pool.slots[0], home0, "long")
        other = make_task(pool.slots[1], home1, "other")
        for task in (long_task, other):
            task.slot.accept(task)
        long_task.submit(segment(0))
        long_task.submit(segment(1))  # slot 1 has nothing of its own: it takes this one
        long_task.submit(segment(2, last=True))
        await asyncio.sleep(0)
        assert isinstance(pool.slots[1].in_flight.work, Segment) and pool.slots[1].in_flight.task is long_task
        pool.workers[1].die(-9)  # killed while decoding a segment of a task homed on slot 0
        other.submit(segment(0, last=True))  # the replacement is not there yet: slot 0 helps
        await pool.workers[0].answer("一")  # long's segment 0: ignored, long has failed
        await pool.workers[0].answer("二")  # other's only segment
        await pool.close()
        return pool, home0, home1

    pool, home0, home1 = run(scenario)
    assert pool.exits == [(1, ExitReason.CRASHED, pool.exits[0][2])] and pool.exits[0][2].task.task_id == "long"
    assert [f.get("error", {}).get("code") for f in home0.frames] == ["worker_crashed"]
    assert home1.frames[-1]["is_final"] and home1.frames[-1]["tokens"] == ["二"]
    assert pool.slots[0].tasks_failed == 1 and pool.slots[1].tasks_done == 1
    assert len(pool.slots[0].backlog) == 0  # the failed task's waiting segment was dropped


def test_a_send_that_fails_loses_that_job_only_and_the_dead_worker_is_handed_nothing_more() -> None:
    """The pipe breaks under a send; the end-of-file that reports the death comes later."""

    async def scenario() -> tuple[Pool, Client, list[Any]]:
        pool = Pool(stealing=False)
        client = Client()
        worker, sent = pool.workers[0], []

        async def breaking_send(job: Any) -> None:
            from capsd.supervisor.slot import WorkerGone

            sent.append(job)
            raise WorkerGone

        worker.send = breaking_send  # type: ignore[method-assign]
        tasks = [make_task(pool.slots[0], client, f"t{i}") for i in range(3)]
        for task in tasks:
            task.slot.accept(task)
            task.submit(segment(0, last=True))
        for _ in range(10):
            await asyncio.sleep(0)
        worker.die(-9)
        await asyncio.sleep(0)
        await pool.close()
        return pool, client, sent

    pool, client, sent = run(scenario)
    assert len(sent) == 1  # nothing more to the worker that is gone
    assert [(slot, reason, lost.task.task_id) for slot, reason, lost in pool.exits] == [(0, ExitReason.CRASHED, "t0")]
    assert [(f["task_id"], f["error"]["code"]) for f in client.frames] == [("t0", "worker_crashed")]
    assert len(pool.slots[0].backlog) == 2  # t1 and t2 wait for the next worker


def test_an_idle_worker_dying_fails_nothing() -> None:
    async def scenario() -> Pool:
        pool = Pool(stealing=True)
        pool.workers[0].die(-9)
        await pool.close()
        return pool

    pool = run(scenario)
    assert pool.exits == [(0, ExitReason.CRASHED, None)]


def test_a_short_final_segment_is_merged_without_a_worker() -> None:
    async def scenario() -> Client:
        pool = Pool(stealing=True)
        client = Client()
        task = make_task(pool.slots[0], client, source="mic")
        pool.slots[0].accept(task)
        task.submit(segment(0))
        task.submit(Segment(1, 2.0, 0.0, np.zeros(0, np.float32), True))  # a mic task's empty final frame
        await pool.workers[0].answer("七")
        await pool.close()
        return client

    client = run(scenario)
    assert client.frames[-1]["is_final"] and client.frames[-1]["tokens"] == ["七"]


def test_a_slot_scaled_away_hands_its_waiting_jobs_over_and_its_tasks_finish_elsewhere() -> None:
    async def scenario() -> tuple[Pool, Client, list[str]]:
        pool = Pool(stealing=False)  # without stealing, only the handover can serve them
        client = Client()
        task = make_task(pool.slots[1], client)
        pool.slots[1].accept(task)
        task.submit(segment(0))  # in slot 1's worker
        task.submit(segment(1))  # waiting in slot 1's queue
        await asyncio.sleep(0)
        pool.slots[1].retire(lambda task_id: pool.slots[0])
        moved = [len(pool.slots[0].backlog) + (pool.slots[0].in_flight is not None), len(pool.slots[1].backlog)]
        task.submit(segment(2, last=True))  # still to come: to slot 0 as well
        await pool.workers[1].answer("一")  # the job in hand finishes, then the worker is stopped
        await pool.workers[0].answer("二")
        await pool.workers[0].answer("三")
        await pool.close()
        return pool, client, [str(n) for n in moved]

    pool, client, moved = run(scenario)
    assert moved == ["1", "0"]
    assert pool.exits == [(1, ExitReason.REQUESTED, None)]  # stopped, nothing lost
    assert [f["is_final"] for f in client.frames].count(True) == 1 and "error" not in client.frames[-1]
    assert client.frames[-1]["text"] == "123"
    assert pool.slots[1].tasks_done == 1 and not pool.slots[1].open_tasks  # still its home, to the end
    assert client.queued_jobs == 0


# -- a long task: partial frames rate-limited, its final frame built off the loop (docs/design.md#long-tasks)


class EndingSlot(HomeSlot):
    """Enough of a slot to see how its tasks end."""

    def __init__(self) -> None:
        self.ends: list[str] = []

    def finished(self, task: Task, outcome: str) -> None:
        self.ends.append(outcome)

    def cancel(self, task: Task) -> None:
        self.ends.append("cancelled")


def digits(index: int, count: int = 2) -> tuple[list[str], list[float]]:
    return ["一"] * count, [0.5 * k / count for k in range(count)]


def test_partial_frames_come_at_most_every_interval_with_the_latest_state() -> None:
    async def scenario() -> tuple[Client, list[int], float]:
        client = Client()
        task = make_task(EndingSlot(), client)
        start = time.monotonic()
        for i in range(50):  # a burst: 50 segments merged within a few milliseconds
            task.segment_decoded(segment(i), *digits(i), 1.0)
        burst = time.monotonic() - start
        in_burst = len(client.frames)
        await asyncio.sleep(PARTIAL_INTERVAL_S * 3)  # the held-back frame goes out once due
        after = len(client.frames)
        task.segment_decoded(segment(50, last=True), *digits(50), 1.0)
        await asyncio.sleep(PARTIAL_INTERVAL_S * 2)
        return client, [in_burst, after], burst

    client, counts, burst = asyncio.run(scenario())
    assert 1 <= counts[0] <= 1 + burst / PARTIAL_INTERVAL_S  # the first at once, then held back
    assert counts[1] == counts[0] + 1  # one more, not one per segment held back ...
    assert len(client.frames[counts[1] - 1]["tokens"]) == 100  # ... carrying every segment merged
    assert [f["is_final"] for f in client.frames] == [False] * counts[1] + [True]
    assert len(client.frames[-1]["tokens"]) == 102


def test_a_held_back_partial_frame_is_superseded_by_the_final_frame_not_sent_after_it() -> None:
    async def scenario() -> Client:
        client = Client()
        task = make_task(EndingSlot(), client)
        task.segment_decoded(segment(0), *digits(0), 1.0)  # sent at once
        task.segment_decoded(segment(1), *digits(1), 1.0)  # held back ...
        task.segment_decoded(segment(2, last=True), *digits(2), 1.0)  # ... and superseded, not waited for
        await asyncio.sleep(PARTIAL_INTERVAL_S * 2)
        return client

    assert [f["is_final"] for f in asyncio.run(scenario()).frames] == [False, True]


@pytest.mark.parametrize("end", ["fail", "cancel", None])
def test_a_long_task_gets_exactly_one_final_frame_whatever_happens_while_it_is_realigned(end: str | None) -> None:
    """The final frame of a long task is built in a thread; a failure or a cancel meanwhile is
    the task's end, and the frame built is dropped."""

    async def scenario() -> tuple[Client, EndingSlot, bool]:
        client, slot = Client(), EndingSlot()
        task = make_task(slot, client)
        task.segment_decoded(segment(0), *digits(0, INLINE_FINAL_TOKENS), 1.0)
        task.segment_decoded(segment(1, last=True), *digits(1, 10), 2.0)
        building = task.finishing is not None and not task.finishing.done()
        if end == "fail":
            task.fail("shutting_down", "capsd is stopping")
        elif end == "cancel":
            task.cancel()
        assert task.finishing is not None
        await task.finishing
        await asyncio.sleep(PARTIAL_INTERVAL_S * 2)
        return client, slot, building

    client, slot, building = asyncio.run(scenario())
    assert building  # the event loop was free while it was built
    finals = [f for f in client.frames if f["is_final"]]
    if end == "fail":
        assert [f["error"]["code"] for f in finals] == ["shutting_down"] and slot.ends == ["shutting_down"]
    elif end == "cancel":
        assert finals == [] and slot.ends == ["cancelled"]
    else:
        assert len(finals) == 1 and "error" not in finals[0] and slot.ends == ["done"]
        assert len(finals[0]["tokens"]) == INLINE_FINAL_TOKENS + 10


def test_a_task_longer_than_the_maximum_fails_with_overloaded_and_takes_nothing_more() -> None:
    client, slot = Client(), EndingSlot()
    task = make_task(slot, client)
    beyond = Segment(7, MAX_TASK_S - 1.0, 2.0, np.zeros(3 * 16000, np.float32), False)
    task.submit(beyond)
    task.submit(dataclasses.replace(beyond, index=8, offset=MAX_TASK_S + 2.0))
    assert [f["error"]["code"] for f in client.frames] == ["overloaded"] and slot.ends == ["overloaded"]
    assert "24 h" in client.frames[0]["error"]["message"]


def test_a_workers_cpu_share_counts_from_its_start_not_from_its_first_sample() -> None:
    """A forked worker may do its first jobs before the watch loop first samples it."""

    class Busy(FakeWorker):
        cpu = 2.0  # CPU seconds already spent when first sampled

        def cpu_seconds(self) -> float | None:
            return self.cpu

    async def scenario() -> list[float]:
        slot = Slot(0, WorkerSpec("paraformer", {}, 1), 100, False, lambda *_: None, spawn=Busy)  # type: ignore[arg-type]
        slot.start()
        inc = slot.incarnation
        inc.started = time.monotonic() - 4.0  # type: ignore[union-attr]
        slot.sample_cpu(time.monotonic())
        first = slot.cpu_share()
        inc.cpu = 3.0  # type: ignore[union-attr]
        slot.sample_cpu(time.monotonic() + 1.0)
        return [first, slot.cpu_share()]

    first, later = asyncio.run(scenario())
    assert first == pytest.approx(0.5, rel=0.05) and later == pytest.approx(0.6, rel=0.05)
