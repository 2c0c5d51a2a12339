"""The supervisor: start the slots, serve, watch the workers, stop gracefully.

Its loop reads as a list of duties, like gunicorn's arbiter: `start_slots`, `watch_workers`
(hung and bloated workers), `count_crash` (restart intensity, OTP style), `stop`; and the pool's
changes while it serves (docs/design.md#changing-the-pool): `scale`, `restart`, `change_model`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from collections import deque
from collections.abc import Callable

import psutil
import structlog

from capsd import __version__, memory, preflight
from capsd import log as logs
from capsd.config import Config, ConfigError
from capsd.control_protocol import DRAIN_TIMEOUT_S, ControlError, PlanRefused
from capsd.protocol import LONGEST_SEGMENT_S, ErrorCode, clip, route
from capsd.supervisor import control, notify
from capsd.supervisor.front import Front
from capsd.supervisor.metrics import Metrics
from capsd.supervisor.queue import Waiting
from capsd.supervisor.slot import ExitReason, Incarnation, Slot, SlotState
from capsd.supervisor.task import Formatting
from capsd.worker.messages import WorkerSpec

log = structlog.get_logger("capsd.supervisor")

WATCH_INTERVAL_S = 0.5
# A worker that cannot be spawned is tried again after 0.5, 1, 2 ... s, at most 30 s apart.
SPAWN_RETRY_S, SPAWN_RETRY_MAX_S = 0.5, 30.0
# This many distinct jobs lost to crashed or hung workers within restart_period_s: the machine,
# not a job, is at fault, and lost jobs are not retried until that window clears.
RETRY_PAUSE_JOBS = 3
# What SIGHUP can change in a running daemon; anything else needs a restart.
RELOADABLE = {
    "server": {"max_connections", "stop_timeout_s"},
    "workers": {"max_rss_mb", "heartbeat_timeout_s", "restart_intensity", "restart_period_s", "queue_limit",
                "load_timeout_s", "retry_lost_jobs"},
    "log": {"level", "format"},
}
# What SIGHUP changes by changing the pool while it serves (docs/design.md#changing-the-pool).
POOL = {"workers": {"count"}, "model": {"type", "dir", "files", "punctuation"}}


def model_key(spec: WorkerSpec) -> tuple[object, ...]:
    """Workers alike in memory: the same model files, punctuation and threads."""
    return spec.model_type, tuple(sorted(spec.files.items())), spec.punctuation, spec.threads


class Daemon:
    def __init__(self, cfg: Config, checked: preflight.Preflight, reload: Callable[[], Config]) -> None:
        self.cfg = cfg
        self.reload = reload
        self.plan = checked.plan
        self.spec = checked.spec  # what new workers run
        self.estimates = {model_key(self.spec): checked.plan.worker_bytes}  # planned peak per model
        self.peaks: dict[tuple[object, ...], int] = {}  # measured peak per model (VmHWM)
        self.count = cfg.workers.count  # slots new tasks route to: slots[:count]
        self.changing = asyncio.Lock()  # one change of the pool at a time
        self.started = time.monotonic()
        self.state = "starting"
        self.crashes: deque[float] = deque()
        self.spawn_retries: dict[Slot, asyncio.TimerHandle] = {}  # pending, per slot
        # Retrying lost jobs (docs/design.md#retrying-a-lost-job): (when, job) of each job lost
        # to a crashed or hung worker, within restart_period_s; what was retried; poison jobs.
        self.job_faults: deque[tuple[float, int]] = deque()
        self.retries_were_paused = False
        self.retried = self.poison_jobs = 0
        self.wanted: Config | None = None  # the latest reload's config, for the pool to reach
        self.reconciling: asyncio.Task[None] | None = None
        self.loop_errors, self.loop_error_logged = 0, 0.0
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.metrics = Metrics(self.status)
        # In index order: the active slots 0..count-1, then slots scaled away that still home tasks.
        self.slots: list[Slot] = []
        self.runners: dict[Slot, asyncio.Task[None]] = {}
        for index in range(self.count):
            self.add_slot(index)
        self.front = Front(
            cfg.server, self.home, self.formatting(), self.not_ready, self.metrics, lambda: self.plan.client_audio_bytes
        )
        self.control = control.ControlServer(cfg.control.socket, self)

    def formatting(self) -> Formatting:
        return Formatting(self.cfg.format.num, self.cfg.format.spell, punctuate=bool(self.spec.punctuation))

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
                        self.worker_exited, self.metrics, peers=self.slots)  # fmt: skip
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

    def finish(self, code: int) -> None:
        if not self.done.done():
            self.done.set_result(code)

    # -- duties -------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.handle_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self.handle_sighup)
        loop.set_exception_handler(self.handle_loop_error)
        try:  # listening from the start, so that /readyz can say "starting"
            await self.front.start()
            await self.control.start()
        except OSError as e:
            log.error("cannot listen", error=str(e))
            self.front.stop_accepting()
            await self.front.close()
            self.control.stop()
            self.cancel_runners()
            return os.EX_CONFIG
        watcher = asyncio.create_task(self.watch_workers())
        code = await self.start_slots()
        if code is None:
            self.state = "ready"
            log.info("memory plan", plan=self.plan.message())
            log.info("capsd ready", slots=len(self.slots), version=__version__, config=self.cfg.source)
            notify.notify(ready=1, status=self.summary())
            code = await self.done
        watcher.cancel()
        await self.stop(code)
        self.cancel_runners()
        return code

    def cancel_runners(self) -> None:
        for runner in self.runners.values():
            runner.cancel()

    async def start_slots(self) -> int | None:
        """Start every worker in parallel; ready when all have loaded (None), else an exit code."""
        notify.notify(status=f"loading the model in {len(self.slots)} workers")
        for slot in self.slots:
            self.start_worker(slot)
        all_ready = asyncio.gather(*(slot.ready_event.wait() for slot in self.slots))
        await asyncio.wait([all_ready, self.done], return_when=asyncio.FIRST_COMPLETED)
        if self.done.done():
            all_ready.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await all_ready  # retrieved, so that asyncio does not report it
            return self.done.result()
        return None

    def runner_ended(self, runner: asyncio.Task[None]) -> None:
        # A slot that stops feeding its worker would hang its clients: give up loudly instead.
        if not runner.cancelled() and runner.exception():
            log.critical("slot dispatcher failed", error=repr(runner.exception()))
            self.finish(os.EX_SOFTWARE)

    def startup_failed(self, slot: Slot, reason: str) -> None:
        # A worker that dies before it is ready has a bad model or environment: restarting it
        # would loop forever, so refuse to start, like uvicorn's STARTUP_FAILURE. A slot added
        # by a scale fails alone: the scale is given up.
        slot.fail(reason)
        log.error("startup failed" if self.state == "starting" else "new slot failed", slot=slot.index, reason=reason)
        if self.state == "starting":
            self.finish(os.EX_CONFIG)

    def start_worker(self, slot: Slot, attempt: int = 0) -> None:
        """Start the slot's worker, unless it has one; one that cannot be spawned (descriptors,
        processes, memory) is tried again after 0.5, 1, 2 ... s, each failure counted against
        restart intensity. While a graceful stop lets tasks finish, a dead worker is replaced too."""
        if pending := self.spawn_retries.pop(slot, None):
            pending.cancel()
        giving_up = self.done.done() and (self.done.result() != os.EX_OK or not self.open_tasks())
        if slot.stopping or slot.retiring or slot.failed or giving_up or not slot.worker_gone:
            return
        try:
            slot.start()
            asyncio.get_running_loop().call_later(self.cfg.workers.load_timeout_s, self.check_loaded, slot, slot.incarnation)
        except OSError as e:
            if not slot.ever_ready:
                self.startup_failed(slot, f"cannot start the worker of slot {slot.index}: {e}")
                return
            delay = min(SPAWN_RETRY_MAX_S, SPAWN_RETRY_S * 2**attempt)
            log.error("cannot start worker", slot=slot.index, error=str(e), retry_in_s=delay)
            self.count_crash(slot)
            self.spawn_retries[slot] = asyncio.get_running_loop().call_later(delay, self.start_worker, slot, attempt + 1)

    def open_tasks(self) -> int:
        return sum(len(slot.open_tasks) for slot in self.slots)

    def check_loaded(self, slot: Slot, inc: Incarnation) -> None:
        """load_timeout_s after a worker started: one still loading is killed, as a crash."""
        if slot.incarnation is inc and not inc.ready:
            log.warning("worker not ready in time", slot=slot.index, pid=inc.pid, load_timeout_s=self.cfg.workers.load_timeout_s)
            slot.kill(ExitReason.NOT_LOADED)

    def worker_exited(self, slot: Slot, reason: ExitReason, exitcode: int | None, lost: Waiting | None) -> None:
        """Every restart decision, in one place: what the exit costs, and what comes next."""
        inc = slot.incarnation
        pid = inc.pid if inc else None
        if slot.retiring:  # scaled away: its worker is not replaced
            log.info("worker stopped: slot scaled away", slot=slot.index, pid=pid, exitcode=exitcode)
            if lost is not None:  # the drain's deadline passed
                self.job_lost(slot, lost, reason, exitcode, f"slot {slot.index} was scaled away and its worker forced to stop")
            return
        if inc is not None and not inc.ready and inc.spec != slot.ready_spec:
            # A new model that passed the checks but does not load: back to the one that does.
            log.error("new model failed to load: the slot keeps the running model", slot=slot.index, pid=pid,
                      exitcode=exitcode, model=inc.spec.model)  # fmt: skip
            slot.run_spec(slot.ready_spec)
            self.start_worker(slot)
            return
        if not slot.ever_ready:
            loading = f"was not ready within load_timeout_s = {self.cfg.workers.load_timeout_s:g} s"
            cause = loading if reason is ExitReason.NOT_LOADED else "died while loading the model"
            self.startup_failed(slot, f"the worker of slot {slot.index} {cause} (exit code {exitcode})")
            return
        slot.count_restart(reason, exitcode)
        level = log.info if not reason.counts and lost is None else log.warning
        level("worker exited", slot=slot.index, pid=pid, reason=reason.value, exitcode=exitcode,
              lost_tasks=[clip(lost.task.task_id)] if lost else [])  # fmt: skip
        if lost is not None:
            self.job_lost(slot, lost, reason, exitcode, f"the worker of slot {slot.index} ended ({reason.value}, exit code {exitcode})")
        if reason.counts:
            self.count_crash(slot)
        self.start_worker(slot)

    def job_lost(self, slot: Slot, item: Waiting, reason: ExitReason, exitcode: int | None, message: str) -> None:
        """A job whose worker died: its task fails with the reason's code, or, with
        `retry_lost_jobs`, the job runs once more (docs/design.md#retrying-a-lost-job)."""
        task = item.task
        if task.done:
            return
        fault = reason.counts  # capsd's own kills (a forced restart or drain) are not the job's fault
        allowed = self.cfg.workers.retry_lost_jobs
        if fault and allowed:
            self.job_faults.append((time.monotonic(), item.job))
        inc = slot.incarnation
        death = f"slot {slot.index} pid {inc.pid if inc else None} {reason.value} (exit code {exitcode})"
        if not allowed:
            task.fail(reason.code, message)
        elif item.faults + fault > allowed:
            self.poison_jobs += 1
            self.metrics.poison_jobs.inc()
            log.error("poison job: not run again", task=clip(task.task_id), audio_s=round(item.audio_s, 2),
                      model=(inc.spec if inc else slot.spec).model, workers=[*item.deaths, death])  # fmt: skip
            task.fail(reason.code, f"{message}; this job ended {item.faults + fault} workers and is not run again")
        elif self.retries_paused():
            task.fail(reason.code, f"{message}; lost jobs are not retried while workers keep dying")
        else:
            self.retried += 1
            self.metrics.retried_jobs.inc()
            log.info("job retried", task=clip(task.task_id), slot=slot.index, reason=reason.value, job=item.job)
            task.queue_slot.retry(item, slot, death, fault)

    def retries_paused(self) -> bool:
        """Whether RETRY_PAUSE_JOBS distinct jobs were lost to crashed or hung workers within
        restart_period_s; a change either way is logged once."""
        now = time.monotonic()
        while self.job_faults and self.job_faults[0][0] < now - self.cfg.workers.restart_period_s:
            self.job_faults.popleft()
        jobs = len({job for _, job in self.job_faults})
        paused = jobs >= RETRY_PAUSE_JOBS
        if paused != self.retries_were_paused:
            self.retries_were_paused = paused
            if paused:
                log.warning("lost jobs not retried: workers keep dying", jobs=jobs,
                            period_s=self.cfg.workers.restart_period_s)  # fmt: skip
            else:
                log.info("lost jobs retried again")
        return paused

    def count_crash(self, slot: Slot) -> None:
        now = time.monotonic()
        self.crashes.append(now)
        while self.crashes and self.crashes[0] < now - self.cfg.workers.restart_period_s:
            self.crashes.popleft()
        if len(self.crashes) > self.cfg.workers.restart_intensity:
            log.critical(
                "restart intensity exceeded",
                slot=slot.index,
                restarts=len(self.crashes),
                period_s=self.cfg.workers.restart_period_s,
            )
            self.finish(os.EX_SOFTWARE)

    async def watch_workers(self) -> None:
        """Hung and bloated workers, and systemd's watchdog and status line."""
        watchdog = notify.watchdog_interval()
        last_ping, last_status = 0.0, ""
        while True:
            now = time.monotonic()
            for slot in list(self.slots):
                slot.sample_cpu(now)
                self.check_worker(slot, now)
                if slot.retiring and not slot.open_tasks and slot.worker_gone:
                    self.remove_slot(slot)  # its last task ended
            if self.retries_were_paused:
                self.retries_paused()  # logs when retries resume
            ping = watchdog is not None and now - last_ping >= watchdog
            status = self.summary()
            if ping or status != last_status:
                notify.notify(status=status, **({"watchdog": 1} if ping else {}))
                last_status, last_ping = status, now if ping else last_ping
            await asyncio.sleep(WATCH_INTERVAL_S)

    def check_worker(self, slot: Slot, now: float) -> None:
        workers, inc = self.cfg.workers, slot.incarnation
        if inc is None or not inc.ready or inc.exited.done() or inc.aborting:
            return
        if why := slot.hung(now, workers.heartbeat_timeout_s):
            log.warning("worker hung: SIGABRT, then SIGKILL", slot=slot.index, pid=inc.pid, why=why)
            slot.kill(ExitReason.HUNG)
            return
        if slot.drain_reason and now > slot.drain_deadline:
            log.warning("drain timed out: forcing the restart", slot=slot.index, pid=inc.pid,
                        reason=slot.drain_reason.value)  # fmt: skip
            slot.kill(slot.drain_reason)
            return
        if not inc.jobs:  # a fresh worker is as small as it gets: recycling it would loop
            return
        key = model_key(inc.spec)
        self.peaks[key] = max(self.peaks.get(key, 0), inc.peak_rss())
        rss, estimate = inc.rss(), self.estimates.get(key, self.plan.worker_bytes)  # of the model it runs
        if rss > estimate and not inc.over_plan:
            inc.over_plan = True
            log.warning("worker above its memory estimate", slot=slot.index, pid=inc.pid, rss_mb=rss >> 20,
                        estimate_mb=estimate >> 20)  # fmt: skip
        if workers.max_rss_mb and not slot.drain_reason and rss > workers.max_rss_mb * 2**20:
            log.warning("worker over max_rss_mb", slot=slot.index, pid=inc.pid, rss_mb=rss >> 20)
            slot.drain(ExitReason.RSS)

    def handle_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        """Errors the event loop cannot hand to anyone (a failed accept() when descriptors run
        out, which asyncio retries every second): logged at most once a second, with a count."""
        self.loop_errors += 1
        now = time.monotonic()
        if now - self.loop_error_logged >= 1.0:
            log.error("event loop error", message=context.get("message"), error=repr(context.get("exception")),
                      count=self.loop_errors)  # fmt: skip
            self.loop_errors, self.loop_error_logged = 0, now

    def handle_stop(self, sig: signal.Signals) -> None:
        log.info("stopping", signal=sig.name)
        self.front.stop_accepting()  # /readyz says 503 from this moment on
        self.finish(os.EX_OK)

    def not_ready(self) -> str | None:
        """Why new tasks would not be served now, or None: what GET /readyz answers."""
        if self.state == "starting":
            return "starting: the workers are loading the model"
        if self.state == "stopping" or not self.front.accepting:
            return "stopping"
        if not any(slot.state in (SlotState.READY, SlotState.BUSY) for slot in self.slots):
            return "no worker is ready"
        return None

    def handle_sighup(self) -> None:
        """Reread the config; apply what can change while running, say what cannot. A changed
        [workers] count or [model] changes the pool while it serves, in the background. Ignored
        from the first moment of a stop: nothing is started that the stop would have to undo."""
        if self.done.done():
            log.info("reload ignored: capsd is stopping")
            return
        try:
            new = self.reload()
        except ConfigError as e:
            log.error("reload refused: keeping the running config", reason=str(e))
            return
        applied, kept, pool = [], [], []
        sections = {}
        for section in (f.name for f in dataclasses.fields(Config) if f.name != "source"):
            old_values, new_values = getattr(self.cfg, section), getattr(new, section)
            changes = {
                f.name: getattr(new_values, f.name)
                for f in dataclasses.fields(old_values)
                if getattr(old_values, f.name) != getattr(new_values, f.name)
            }
            allowed = {k: v for k, v in changes.items() if k in RELOADABLE.get(section, ())}
            applied += [f"[{section}] {k}" for k in allowed]
            pool += [f"[{section}] {k}" for k in changes if k in POOL.get(section, ())]
            kept += [f"[{section}] {k}" for k in changes if k not in allowed and k not in POOL.get(section, ())]
            sections[section] = dataclasses.replace(old_values, **allowed)
        self.cfg = dataclasses.replace(self.cfg, **sections)
        self.front.cfg = self.cfg.server
        for slot in self.slots:
            slot.set_queue_limit(self.cfg.workers.queue_limit)
        logs.setup(self.cfg.log.level, self.cfg.log.format)
        log.info("config reloaded", applied=applied or "nothing changed", changing_the_pool=pool or "no")
        if kept:
            log.warning("config changes need a restart: systemctl restart capsd", not_applied=kept)
        if pool or self.reconciling is not None:
            self.wanted = new
            if self.reconciling is None:
                self.reconciling = asyncio.get_running_loop().create_task(self.reconcile())

    async def reconcile(self) -> None:
        """Bring the pool to the latest reload's [model], then its count, each refused alone with
        the reason logged. A reload during a change is reached once that change ends: the last
        reload wins."""
        try:
            while (new := self.wanted) is not None and not self.done.done():
                self.wanted = None
                async with self.changing:
                    if new.model != self.cfg.model:
                        await self.change_model(new)
                    if new.workers.count != self.count and not self.done.done():
                        try:
                            await self.scale(new.workers.count)
                        except ControlError as e:
                            log.error("scale refused: keeping the running count", count=self.count, reason=str(e))
        finally:
            self.reconciling = None

    # -- changing the pool while it serves (docs/design.md#changing-the-pool) -------------------

    def worker_bytes(self, spec: WorkerSpec) -> int:
        """A worker's planned peak: the estimate, or more if workers of this model measured more."""
        key = model_key(spec)
        return max(self.estimates[key], self.peaks.get(key, 0))

    def plan_for(self, count: int, worker_bytes: int) -> memory.Plan:
        """The memory plan for `count` workers while capsd runs: what it holds now is available
        to it, as well as what the machine or cgroup has free."""
        free = memory.read_available()
        held = _rss_of_tree()
        detail = f"{free.detail}, plus {memory.format_bytes(held)} capsd holds"
        available = memory.Available(free.bytes + held, free.limit, detail)
        reserve = self.cfg.workers.memory_reserve_mb * memory.MIB
        return memory.plan(count, worker_bytes, available, reserve, LONGEST_SEGMENT_S, self.cfg.server.max_message_bytes)

    async def scale(self, count: int, timeout: float = DRAIN_TIMEOUT_S) -> dict[str, object]:
        """Grow: the memory plan first, then new slots, routed to once all are ready. Shrink:
        the slots that go take no new task and hand their waiting jobs to the others; their
        workers stop after the job in hand; each slot goes when its last task ends."""
        before = self.count
        if count > before:
            plan = self.plan_for(count, self.worker_bytes(self.spec))
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
            self.plan = self.plan_for(count, self.worker_bytes(self.spec))
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

    async def change_model(self, new: Config) -> None:
        """Check the new [model] as check-config would and plan old and new side by side, then
        roll every slot onto it; if a worker cannot load it, roll back."""
        try:
            spec, estimate = preflight.worker(dataclasses.replace(self.cfg, model=new.model))
        except ConfigError as e:
            log.error("model change refused: keeping the running model", reason=str(e))
            return
        self.estimates.setdefault(model_key(spec), estimate)
        # During the roll each slot runs one model or the other: plan every slot at the larger.
        plan = self.plan_for(self.count, max(self.worker_bytes(self.spec), self.worker_bytes(spec)))
        if not plan.fits:
            log.error("model change refused: keeping the running model", reason=plan.message())
            return
        old = self.spec
        log.info("model change: rolling restart", slots=self.count, model=spec.model, before=old.model)
        if not await self.roll(spec):
            log.error("model change failed: rolling back to the running model", model=spec.model)
            await self.roll(old)
            return
        self.plan = self.plan_for(self.count, self.worker_bytes(spec))
        self.cfg = dataclasses.replace(self.cfg, model=new.model)
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

    async def stop(self, code: int) -> None:
        """Stop accepting, let tasks finish (not when giving up), fail the rest, stop workers."""
        self.state = "stopping"
        notify.notify(stopping=1, status="stopping")
        self.front.stop_accepting()
        deadline = time.monotonic() + (self.cfg.server.stop_timeout_s if code == os.EX_OK else 0)
        while any(slot.open_tasks for slot in self.slots) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)  # polled: once, at a stop, for at most stop_timeout_s
        for slot in self.slots:
            for task in list(slot.open_tasks):
                task.fail(ErrorCode.SHUTTING_DOWN, "capsd is stopping")
        # Nothing needs the workers now: they stop while the connections close.
        await asyncio.gather(self.front.close(), self.stop_workers())
        self.control.stop()  # status answered to the end: what a drain still holds is what operators ask
        log.info("capsd stopped", exit_code=code)

    async def stop_workers(self) -> None:
        await asyncio.gather(*(slot.stop(timeout=5) for slot in self.slots))

    # -- status -------------------------------------------------------------------------------

    def summary(self) -> str:
        ready = sum(slot.state in (SlotState.READY, SlotState.BUSY) for slot in self.slots)
        tasks = sum(len(slot.open_tasks) for slot in self.slots)
        restarts = sum(slot.restarts for slot in self.slots)
        return f"{ready}/{self.count} slots ready, {tasks} tasks in progress, {restarts} restarts"

    def status(self) -> dict[str, object]:
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "version": __version__,
            "state": self.state,
            "slots": [slot.status() for slot in self.slots],
            "memory": {
                "planned_bytes": self.plan.total_bytes,
                "available_bytes": self.plan.available_bytes,
                "worker_bytes": self.worker_bytes(self.spec),  # what growth plans per worker
                "worker_peak_bytes": self.peaks.get(model_key(self.spec), 0),  # measured, workers of this model
            },
            "retries": {"retried": self.retried, "poison_jobs": self.poison_jobs, "paused": self.retries_were_paused},
            "connections": len(self.front.clients),
            "intake": self.front.intake.status(),
            "audio_per_second": round(self.metrics.audio_per_second(), 3),
        }


def _rss_of_tree() -> int:
    """The resident memory of capsd: this process and its children (workers, resource tracker)."""
    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_info().rss
    return total
