"""The pool's changes while it serves (docs/design.md#changing-the-pool): routing to the active
slots, growing and shrinking, restarting workers one slot or all, rolling onto a new model, and
the reconcile that brings the pool to what the latest reload asked for. The memory plan comes
first; one change at a time (`changing`).

`PoolChanges` is the daemon's part that changes the pool; `capsd.supervisor.daemon.Daemon` is
the rest of it (its life cycle, the watch loop, every restart decision).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import structlog

from capsd import memory, preflight
from capsd.config import Config, ConfigError, ModelConfig
from capsd.control_protocol import DRAIN_TIMEOUT_S, ControlError, PlanRefused
from capsd.protocol import LONGEST_SEGMENT_S, route
from capsd.supervisor.front import Front
from capsd.supervisor.loader import Loaders
from capsd.supervisor.metrics import Metrics
from capsd.supervisor.policy import model_key
from capsd.supervisor.queue import Waiting
from capsd.supervisor.slot import ExitReason, Incarnation, Slot
from capsd.supervisor.task import Formatting
from capsd.worker.messages import WorkerSpec

log = structlog.get_logger("capsd.supervisor")

# A worker that cannot be spawned is tried again after 0.5, 1, 2 ... s, at most 30 s apart.
SPAWN_RETRY_S, SPAWN_RETRY_MAX_S = 0.5, 30.0
# What SIGHUP changes by changing the pool while it serves (docs/design.md#changing-the-pool).
POOL = {"workers": {"count"}, "model": {"type", "dir", "files", "punctuation"}}


@dataclass(frozen=True)
class Shape:
    """What the pool is to be: its number of slots, its model."""

    count: int
    model: ModelConfig


@dataclass(frozen=True)
class ScaleWaiter:
    """A capsctl scale waiting for the pool to reach its count."""

    count: int
    timeout: float  # each going slot's drain limit
    reply: asyncio.Future[dict[str, object]]


class PoolChanges:
    # What the pool's changes read and write of the daemon (set in Daemon.__init__).
    cfg: Config
    spec: WorkerSpec  # what new workers run
    plan: memory.Plan
    estimates: dict[tuple[object, ...], memory.Estimate]  # planned peaks per model
    peaks: dict[tuple[object, ...], int]  # measured peak per model (VmHWM)
    count: int  # slots new tasks route to: slots[:count]
    slots: list[Slot]  # in index order: the active slots, then slots scaled away that still home tasks
    runners: dict[Slot, asyncio.Task[None]]
    changing: asyncio.Lock  # one change of the pool at a time
    wanted: Shape  # what the pool is to be: the latest wish (a reload, capsctl scale)
    scale_waiter: ScaleWaiter | None  # a capsctl scale, until the step that reaches its count ends
    reconciling: asyncio.Task[None] | None  # the duty that reaches `wanted`, while it runs
    done: asyncio.Future[int]
    metrics: Metrics
    front: Front
    new_incarnation: Callable[[int, WorkerSpec], Incarnation]
    loaders: Loaders
    start_worker: Callable[[Slot], None]
    worker_exited: Callable[[Slot, ExitReason, int | None, Waiting | None], None]
    runner_ended: Callable[[asyncio.Task[None]], None]
    formatting: Callable[[], Formatting]

    def home(self, task_id: str) -> Slot:
        """A new task's home slot (docs/design.md#routing-is-crc32)."""
        return self.slots[route(task_id, self.count)]

    def add_slot(self, index: int) -> Slot:
        """Slot `index`, new, or one scaled away that still homes tasks, active again."""
        if index < len(self.slots) and self.slots[index].index == index:
            slot = self.slots[index]
            slot.unretire(self.spec)
        else:
            slot = Slot(index, self.spec, self.cfg.workers.queue_limit, self.cfg.workers.work_stealing,
                        self.worker_exited, self.metrics, peers=self.slots, spawn=self.new_incarnation)  # fmt: skip
            self.slots.insert(index, slot)
            runner = asyncio.get_running_loop().create_task(slot.run())
            runner.add_done_callback(self.runner_ended)
            self.runners[slot] = runner
        return slot

    def remove_slot(self, slot: Slot) -> None:
        self.slots.remove(slot)
        slot.remove()
        self.runners.pop(slot)
        log.info("slot removed", slot=slot.index, slots=len(self.slots))

    # -- the wanted shape, and the one duty that reaches it --------------------------------------

    def running(self) -> Shape:
        return Shape(self.count, self.cfg.model)

    def want(self, shape: Shape) -> None:
        """The pool is to have `shape`: the reconcile duty takes it there. The last wish wins."""
        self.wanted = shape
        if self.reconciling is None and (shape != self.running() or self.scale_waiter is not None):
            self.reconciling = asyncio.get_running_loop().create_task(self.reconcile())

    @property
    def pool_changing(self) -> bool:
        """A change of the pool is under way (or about to be): another is refused until it ends."""
        return self.changing.locked() or self.reconciling is not None

    async def scale(self, count: int, timeout: float = DRAIN_TIMEOUT_S) -> dict[str, object]:
        """`capsctl scale`: only the wanted count changes; the reply comes once the pool has
        that many slots, or says why not (ControlError)."""
        reply: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()
        self.scale_waiter = ScaleWaiter(count, timeout, reply)
        self.want(dataclasses.replace(self.wanted, count=count))
        return await reply

    async def reconcile(self) -> None:
        """Compare the wanted shape with the running one and take one step towards it, until
        they agree, like gunicorn's manage_workers: the model first, then the count. A step that
        is refused or fails gives that part of the wish up, with the reason logged (or told to
        the capsctl scale that asked). A wish made during a step is reached once it ends."""
        try:
            while not self.done.done():
                wanted = self.wanted
                async with self.changing:
                    if wanted.model != self.cfg.model:
                        await self.change_model(wanted.model)
                        if self.cfg.model != wanted.model and self.wanted.model == wanted.model:
                            self.wanted = dataclasses.replace(self.wanted, model=self.cfg.model)  # given up
                    elif wanted.count != self.count or self.scale_waiter is not None:
                        await self.resize(wanted.count)
                    else:
                        return
        finally:
            self.reconciling = None
            if self.scale_waiter is not None:  # capsd stops before its step, or the step failed
                why = "capsd is stopping" if self.done.done() else "the change of the pool failed"
                self.scale_waiter.reply.set_exception(ControlError(why))
                self.scale_waiter = None

    async def resize(self, count: int) -> None:
        """One step: the pool to `count` slots; refused, the wanted count is the running one again."""
        waiter = self.scale_waiter  # until the step ends: a reload meanwhile leaves its count alone
        if waiter is not None and waiter.count != count:  # a reload wished otherwise first
            waiter.reply.set_exception(ControlError(f"a reload asked for {count} slots meanwhile"))
            waiter = self.scale_waiter = None
        try:
            result = await self.grow_or_shrink(count, waiter.timeout if waiter else DRAIN_TIMEOUT_S)
        except ControlError as e:
            self.scale_waiter = None
            if self.wanted.count == count:
                self.wanted = dataclasses.replace(self.wanted, count=self.count)
            if waiter is None:
                log.error("scale refused: keeping the running count", count=self.count, reason=str(e))
            else:
                waiter.reply.set_exception(e)
            return
        self.scale_waiter = None
        if waiter is not None:
            waiter.reply.set_result(result)

    def estimate(self, spec: WorkerSpec) -> memory.Estimate:
        """The planned peaks of a model's worker and loader; as spawned workers once its workers
        are spawned rather than forked (docs/design.md#workers-forked-from-a-loader)."""
        key = model_key(spec)
        if self.estimates[key].loader and key in self.loaders.refused:
            self.estimates[key] = preflight.estimate(spec, forked=False)
            self.peaks.pop(key, None)  # what forked workers held alone
        return self.estimates[key]

    def worker_bytes(self, spec: WorkerSpec) -> int:
        """A worker's planned peak: the estimate, or more if workers of this model measured more
        (what a forked worker holds alone)."""
        return max(self.estimate(spec).worker, self.peaks.get(model_key(spec), 0))

    def loader_bytes(self, *specs: WorkerSpec) -> int:
        """The planned peak of the loaders of these models (0 for one whose workers are spawned)."""
        return sum(self.estimate(spec).loader for spec in {model_key(spec): spec for spec in specs}.values())

    def plan_for(self, count: int, worker_bytes: int, loader_bytes: int) -> memory.Plan:
        """The memory plan for `count` workers while capsd runs: what it holds now is available
        to it, as well as what the machine or cgroup has free."""
        free = memory.read_available()
        held = _held_by_tree()
        detail = f"{free.detail}, plus {memory.format_bytes(held)} capsd holds"
        available = memory.Available(free.bytes + held, free.limit, detail)
        reserve = self.cfg.workers.memory_reserve_mb * memory.MIB
        return memory.plan(count, worker_bytes, available, reserve, LONGEST_SEGMENT_S, self.cfg.server.max_message_bytes,
                           loader_bytes, api=self.cfg.api.port != 0)  # fmt: skip

    async def grow_or_shrink(self, count: int, timeout: float) -> dict[str, object]:
        """Grow: the memory plan first, then new slots, routed to once all are ready. Shrink:
        the slots that go take no new task and hand their waiting jobs to the others; their
        workers stop after the job in hand; each slot goes when its last task ends."""
        before = self.count
        if count > before:
            plan = self.plan_for(count, self.worker_bytes(self.spec), self.loader_bytes(self.spec))
            if not plan.fits:
                raise PlanRefused(plan.message(fix=f"capsctl scale {plan.max_count}"))
            added = [self.add_slot(index) for index in range(before, count)]
            for slot in added:
                self.start_worker(slot)
            loaded = await asyncio.gather(*(self.loaded(slot) for slot in added))
            if not all(loaded):
                for slot in added:
                    slot.retire(self.home)
                failed = next(slot.index for slot, ok in zip(added, loaded) if not ok)
                raise ControlError(f"the worker of slot {failed} did not load; the pool keeps {before} slots")
            self.plan, self.count = plan, count
        elif count < before:
            self.count = count
            going = self.slots[count:before]
            for slot in going:
                slot.retire(self.home, timeout)
            await asyncio.gather(*(asyncio.shield(slot.incarnation.exited) for slot in going if slot.incarnation))
            self.plan = self.plan_for(count, self.worker_bytes(self.spec), self.loader_bytes(self.spec))
        self.cfg = dataclasses.replace(self.cfg, workers=dataclasses.replace(self.cfg.workers, count=count))
        log.info("pool scaled", slots=count, before=before, plan=self.plan.message())
        return {"count": count, "before": before, "plan": self.plan.message()}

    async def loaded(self, slot: Slot) -> bool:
        """Whether the slot's current (or next) worker becomes ready. A worker not ready within
        load_timeout_s is killed, so the wait is bounded by the config, not by a number of its own."""
        if slot.failed:  # a new slot whose worker could not start
            return False
        inc = slot.incarnation
        if inc is None or inc.exited.done():  # its spawn is to be retried
            try:
                await asyncio.wait_for(slot.ready_event.wait(), self.cfg.workers.load_timeout_s + SPAWN_RETRY_MAX_S)
            except asyncio.TimeoutError:
                return False
            return True
        return await asyncio.shield(inc.loaded)

    async def restart(self, slot: Slot, force: bool = False, timeout: float | None = None) -> dict[str, object]:
        """Replace the slot's worker (graceful: after the job in hand), return when the new one is ready."""
        old = slot.incarnation
        if old is None or not old.ready:
            raise ControlError(f"slot {slot.index} is {slot.state.shown}; try again when it is ready")
        log.info("restart requested", slot=slot.index, pid=old.pid, force=force)
        if force:
            slot.kill(ExitReason.REQUESTED)
        else:
            slot.drain(ExitReason.REQUESTED, timeout or DRAIN_TIMEOUT_S)  # forced at the deadline
        await asyncio.shield(old.exited)
        if not await self.loaded(slot):
            raise ControlError(f"slot {slot.index}: the new worker did not load")
        return {"slot": slot.index, "old_pid": old.pid, "new_pid": slot.incarnation.pid}

    async def rolling_restart(self, force: bool = False, timeout: float | None = None) -> list[dict[str, object]]:
        """One slot at a time, the next once the previous replacement is ready: never more than
        one slot down (and, with stealing, the others take its waiting jobs)."""
        log.info("rolling restart", slots=self.count, force=force)
        restarted = []
        for slot in self.slots[: self.count]:
            await self.loaded(slot)  # a slot restarting after a crash is replaced once ready
            restarted.append(await self.restart(slot, force, timeout))
        return restarted

    async def change_model(self, model: ModelConfig) -> None:
        """Check the new [model] as check-config would and plan old and new side by side, then
        roll every slot onto it; if a worker cannot load it, roll back."""
        try:
            spec, estimate = preflight.worker(dataclasses.replace(self.cfg, model=model))
        except ConfigError as e:
            log.error("model change refused: keeping the running model", reason=str(e))
            return
        self.estimates.setdefault(model_key(spec), estimate)
        # During the roll each slot runs one model or the other: plan every slot at the larger,
        # and both models' loaders.
        plan = self.plan_for(self.count, max(self.worker_bytes(self.spec), self.worker_bytes(spec)),
                             self.loader_bytes(self.spec, spec))  # fmt: skip
        if not plan.fits:
            log.error("model change refused: keeping the running model", reason=plan.message())
            return
        old = self.spec
        log.info("model change: rolling restart", slots=self.count, model=spec.model, before=old.model)
        await self.loaders.ready(spec)  # the new model's loader first, if workers are forked
        if not await self.roll(spec):
            log.error("model change failed: rolling back to the running model", model=spec.model)
            await self.roll(old)
            await self.loaders.keep_only([old])
            return
        await self.loaders.keep_only([spec])
        self.plan = self.plan_for(self.count, self.worker_bytes(spec), self.loader_bytes(spec))
        self.cfg = dataclasses.replace(self.cfg, model=model)
        self.front.formatting = self.formatting()
        log.info("model changed", model=spec.model)

    async def roll(self, spec: WorkerSpec) -> bool:
        """Every active slot onto `spec`, one at a time; False at the first worker that does not load it."""
        self.spec = spec
        for slot in self.slots[: self.count]:
            if slot.ready_spec == spec and slot.spec == spec:
                continue
            slot.run_spec(spec)
            try:
                await self.loaded(slot)  # as in rolling_restart
                await self.restart(slot)
            except ControlError:
                return False
            if slot.ready_spec != spec:  # reverted by worker_exited
                return False
        return True


def _held_by_tree() -> int:
    """The memory capsd holds: this process and its children (loaders, workers, resource
    tracker), each page once: their PSS, which shares a page among the processes that map it
    (a forked worker's RSS counts the model its loader holds too)."""
    me = psutil.Process()
    total = 0
    for process in (me, *me.children(recursive=True)):
        with contextlib.suppress(psutil.Error):
            total += process.memory_full_info().pss
    return total
