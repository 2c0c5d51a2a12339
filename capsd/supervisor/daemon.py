"""The supervisor: start the slots, serve, watch the workers, decide what follows each worker's
end, reload, stop gracefully.

Its loop reads as a list of duties, like gunicorn's arbiter: `start_slots`, `watch_workers`
(hung and bloated workers), `worker_exited` (every restart decision, by the pure rules of
`capsd.supervisor.policy`), `stop`. The pool's changes while it serves are `PoolChanges`
(`capsd.supervisor.pool`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from capsd import __version__, preflight
from capsd import log as logs
from capsd.api.server import Api
from capsd.config import Config, ConfigError, WorkersConfig
from capsd.protocol import ErrorCode, clip
from capsd.supervisor import control, notify
from capsd.supervisor.front import Front
from capsd.supervisor.loader import Loader, Loaders, become_subreaper
from capsd.supervisor.metrics import Metrics
from capsd.supervisor.policy import (
    RETRY_PAUSE_JOBS,
    ExitAction,
    Fate,
    LostJobs,
    RestartBudget,
    exit_action,
    lost_job_fate,
    model_key,
)
from capsd.supervisor.pool import POOL, SPAWN_RETRY_MAX_S, SPAWN_RETRY_S, PoolChanges, ScaleWaiter, Shape
from capsd.supervisor.queue import Waiting
from capsd.supervisor.slot import ExitReason, Incarnation, Slot, SlotState
from capsd.supervisor.task import Formatting
from capsd.worker.messages import WorkerSpec

log = structlog.get_logger("capsd.supervisor")

WATCH_INTERVAL_S = 0.5
# What SIGHUP can change in a running daemon; anything else needs a restart.
RELOADABLE = {
    "server": {"max_connections", "stop_timeout_s"},
    "workers": {"max_rss_mb", "heartbeat_timeout_s", "restart_intensity", "restart_period_s", "queue_limit",
                "load_timeout_s", "retry_lost_jobs"},
    "api": {"keys_file", "max_upload_mb"},
    "log": {"level", "format"},
}


def why_spawned(workers: WorkersConfig) -> str:
    """Why workers are spawned rather than forked from a loader, or "" (docs/design.md#workers-forked-from-a-loader)."""
    if not workers.preload:
        return "[workers] preload = false"
    if workers.threads > 1:
        return f"[workers] threads = {workers.threads}: a model loaded with more than one thread runs a thread pool, and a process with threads cannot be forked safely"
    return become_subreaper()


class Daemon(PoolChanges):
    def __init__(
        self,
        cfg: Config,
        checked: preflight.Preflight,
        reload: Callable[[], Config],
        spawn: Callable[[int, WorkerSpec], Incarnation] = Incarnation,  # a test's fake workers
    ) -> None:
        self.cfg = cfg
        self.spawn = spawn  # a worker that loads the model itself
        self.reload = reload
        self.plan = checked.plan
        self.spec = checked.spec  # what new workers run
        self.estimates = {model_key(self.spec): checked.estimate}  # planned peaks per model
        self.peaks: dict[tuple[object, ...], int] = {}  # measured peak per model (VmHWM)
        self.count = cfg.workers.count  # slots new tasks route to: slots[:count]
        self.changing = asyncio.Lock()  # one change of the pool at a time
        self.started = time.monotonic()
        self.state = "starting"
        self.budget = RestartBudget()
        self.spawn_retries: dict[Slot, asyncio.TimerHandle] = {}  # pending, per slot
        # Retrying lost jobs (docs/design.md#retrying-a-lost-job): (when, job) of each job lost
        # to a crashed or hung worker, within restart_period_s; what was retried; poison jobs.
        self.lost_jobs = LostJobs()
        self.retries_were_paused = False
        self.retried = self.poison_jobs = 0
        self.wanted = Shape(self.count, cfg.model)  # what the pool is to be (docs/design.md#changing-the-pool)
        self.scale_waiter: ScaleWaiter | None = None
        self.reconciling: asyncio.Task[None] | None = None
        self.loop_errors, self.loop_error_logged = 0, 0.0
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.metrics = Metrics(self.status)
        self.loaders = Loaders(why_spawned(cfg.workers), self.loader_event, lambda: self.cfg.workers.load_timeout_s)
        # In index order: the active slots 0..count-1, then slots scaled away that still home tasks.
        self.slots: list[Slot] = []
        self.runners: dict[Slot, asyncio.Task[None]] = {}
        for index in range(self.count):
            self.add_slot(index)
        self.front = Front(
            cfg.server, self.home, self.formatting(), self.not_ready, self.metrics, lambda: self.plan.client_audio_bytes
        )
        self.control = control.ControlServer(cfg.control.socket, self)
        self.api = None if not cfg.api.port else Api(
            cfg.api, preflight.api_addr(cfg), checked.api_keys, self.home, self.formatting,
            lambda: self.front.accepting, self.front.answer_http, self.front.intake, self.model_id,
        )  # fmt: skip

    def model_id(self) -> str:
        """The model the API names (GET /v1/models): its directory's name."""
        return Path(self.spec.model_dir).name or self.spec.model_type

    def new_incarnation(self, index: int, spec: WorkerSpec) -> Incarnation:
        """A slot's next worker: forked from its model's loader, else spawned."""
        loader = self.loaders.forking(spec)
        return loader.fork(index, spec) if loader else self.spawn(index, spec)

    def loader_event(self, loader: Loader) -> None:
        """A loader loaded or ended: the slots waiting for it start their workers, forked or
        spawned. One that ends after loading is replaced, a crash against restart intensity;
        its workers go on. One that cannot load or fork: workers of its model are spawned."""
        if loader.stopping:
            return
        ready, exitcode = loader.ready, loader.exited.result() if loader.exited.done() else None
        if ready is None or ready.cannot_fork:  # it ended while loading, or cannot fork
            why = ready.cannot_fork if ready else f"its loader ended while loading the model (exit code {exitcode})"
            self.loaders.refuse(loader.spec, why)
            self.plan = self.plan_for(self.count, self.worker_bytes(self.spec), self.loader_bytes(self.spec))
            if not self.plan.fits:
                log.warning("spawned workers exceed the memory plan", plan=self.plan.message())
        elif loader.exited.done():
            log.warning("loader exited: replaced; its workers go on", pid=loader.pid, exitcode=exitcode)
            self.loaders.restarts[model_key(loader.spec)] += 1
            self.count_crash()
            if self.model_in_use(loader.spec) and not self.done.done():
                self.loaders.start(loader.spec)
        for slot in self.slots:
            if model_key(slot.spec) == model_key(loader.spec):
                self.start_worker(slot)

    def model_in_use(self, spec: WorkerSpec) -> bool:
        key = model_key(spec)
        return key == model_key(self.spec) or any(key == model_key(slot.spec) for slot in self.slots)

    def formatting(self) -> Formatting:
        return Formatting(self.cfg.format.num, self.cfg.format.spell, punctuate=bool(self.spec.punctuation))

    def finish(self, code: int) -> None:
        if not self.done.done():
            self.done.set_result(code)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.handle_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self.handle_sighup)
        loop.set_exception_handler(self.handle_loop_error)
        try:  # listening from the start, so that /readyz can say "starting"
            await self.front.start()
            if self.api:
                await self.api.start()
            await self.control.start()
        except OSError as e:
            log.error("cannot listen", error=str(e))
            self.front.stop_accepting()
            await self.front.close()
            if self.api:
                await self.api.close()
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
        if self.loaders.waits(slot.spec):  # loader_event starts it
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
        """load_timeout_s after a worker started: one still loading is killed, as a crash; so is
        the loader a worker was forked from and is not ready: it is hung."""
        if slot.incarnation is inc and not inc.ready:
            log.warning("worker not ready in time", slot=slot.index, pid=inc.pid, started=inc.how,
                        load_timeout_s=self.cfg.workers.load_timeout_s)  # fmt: skip
            slot.kill(ExitReason.NOT_LOADED)
            if inc.how == "fork" and (loader := self.loaders.forking(inc.spec)):
                loader.kill()

    def worker_exited(self, slot: Slot, reason: ExitReason, exitcode: int | None, lost: Waiting | None) -> None:
        """Every restart decision, in one place (policy.exit_action): what the exit costs, and
        what comes next."""
        inc = slot.incarnation
        pid = inc.pid if inc else None
        loading_new_model = inc is not None and not inc.ready and inc.spec != slot.ready_spec
        action = exit_action(slot.retiring, loading_new_model, slot.ever_ready)
        if action is ExitAction.LET_GO:
            log.info("worker stopped: slot scaled away", slot=slot.index, pid=pid, exitcode=exitcode)
            if lost is not None:  # the drain's deadline passed
                self.job_lost(slot, lost, reason, exitcode, f"slot {slot.index} was scaled away and its worker forced to stop")
        elif action is ExitAction.ROLL_BACK:
            assert inc is not None
            log.error("new model failed to load: the slot keeps the running model", slot=slot.index, pid=pid,
                      exitcode=exitcode, model=inc.spec.model)  # fmt: skip
            slot.run_spec(slot.ready_spec)
            self.start_worker(slot)
        elif action is ExitAction.STARTUP_FAILED:
            loading = f"was not ready within load_timeout_s = {self.cfg.workers.load_timeout_s:g} s"
            cause = loading if reason is ExitReason.NOT_LOADED else "died while loading the model"
            self.startup_failed(slot, f"the worker of slot {slot.index} {cause} (exit code {exitcode})")
        else:
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
            self.lost_jobs.add(time.monotonic(), item.job)
        inc = slot.incarnation
        death = f"slot {slot.index} pid {inc.pid if inc else None} {reason.value} (exit code {exitcode})"
        fate = lost_job_fate(allowed, item.faults, fault, self.retries_paused)
        if fate is Fate.FAIL:
            task.fail(reason.code, message)
        elif fate is Fate.POISON:
            self.poison_jobs += 1
            self.metrics.poison_jobs.inc()
            log.error("poison job: not run again", task=clip(task.task_id), audio_s=round(item.audio_s, 2),
                      model=(inc.spec if inc else slot.spec).model, workers=[*item.deaths, death])  # fmt: skip
            task.fail(reason.code, f"{message}; this job ended {item.faults + fault} workers and is not run again")
        elif fate is Fate.PAUSED:
            task.fail(reason.code, f"{message}; lost jobs are not retried while workers keep dying")
        else:
            self.retried += 1
            self.metrics.retried_jobs.inc()
            log.info("job retried", task=clip(task.task_id), slot=slot.index, reason=reason.value, job=item.job)
            task.queue_slot.retry(item, slot, death, fault)  # type: ignore[attr-defined]  # a Slot, as task.Home

    def retries_paused(self) -> bool:
        """Whether policy.RETRY_PAUSE_JOBS distinct jobs were lost to crashed or hung workers
        within restart_period_s; a change either way is logged once."""
        period_s = self.cfg.workers.restart_period_s
        jobs = self.lost_jobs.jobs(time.monotonic(), period_s)
        paused = jobs >= RETRY_PAUSE_JOBS
        if paused != self.retries_were_paused:
            self.retries_were_paused = paused
            if paused:
                log.warning("lost jobs not retried: workers keep dying", jobs=jobs, period_s=period_s)
            else:
                log.info("lost jobs retried again")
        return paused

    def count_crash(self, slot: Slot | None = None) -> None:
        """A crash (of a slot's worker, or of a loader) against the restart budget (OTP's restart
        intensity); over it, capsd gives up."""
        workers = self.cfg.workers
        if not self.budget.spend(time.monotonic(), workers.restart_intensity, workers.restart_period_s):
            log.critical("restart intensity exceeded", slot=slot.index if slot else None, restarts=len(self.budget.crashes),
                         period_s=workers.restart_period_s)  # fmt: skip
            self.finish(os.EX_SOFTWARE)

    async def watch_workers(self) -> None:
        """Hung and bloated workers, and systemd's watchdog and status line."""
        watchdog = notify.watchdog_interval()
        last_ping, last_status = 0.0, ""
        while True:
            now = time.monotonic()
            self.watch_slots(now)
            if self.retries_were_paused:
                self.retries_paused()  # logs when retries resume
            ping = watchdog is not None and now - last_ping >= watchdog
            status = self.summary()
            if ping or status != last_status:
                notify.notify(status=status, **({"watchdog": 1} if ping else {}))
                last_status, last_ping = status, now if ping else last_ping
            await asyncio.sleep(WATCH_INTERVAL_S)

    def watch_slots(self, now: float) -> None:
        for slot in list(self.slots):
            slot.sample_cpu(now)
            self.check_worker(slot, now)
            if slot.retiring and not slot.open_tasks and slot.worker_gone:
                self.remove_slot(slot)  # its last task ended

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
        # A forked worker is judged by what it holds alone (USS): the model is its loader's.
        key, forked = model_key(inc.spec), inc.how == "fork"
        rss = inc.private()[0] if forked else inc.rss()
        self.peaks[key] = max(self.peaks.get(key, 0), rss if forked else inc.peak_rss())
        estimate = self.estimate(inc.spec).worker  # of the model it runs
        if rss > estimate and not inc.over_plan:
            inc.over_plan = True
            log.warning("worker above its memory estimate", slot=slot.index, pid=inc.pid, rss_mb=rss >> 20,
                        estimate_mb=estimate >> 20, started=inc.how)  # fmt: skip
        if workers.max_rss_mb and not slot.drain_reason and rss > workers.max_rss_mb * 2**20:
            log.warning("worker over max_rss_mb", slot=slot.index, pid=inc.pid, rss_mb=rss >> 20, started=inc.how)
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
        if self.api:
            self.api.reload(self.cfg.api)  # the keys file is read again, changed or not
        for slot in self.slots:
            slot.set_queue_limit(self.cfg.workers.queue_limit)
        logs.setup(self.cfg.log.level, self.cfg.log.format)
        log.info("config reloaded", applied=applied or "nothing changed", changing_the_pool=pool or "no")
        if kept:
            log.warning("config changes need a restart: systemctl restart capsd", not_applied=kept)
        if pool or (self.reconciling is not None and self.scale_waiter is None):  # a capsctl scale's count stands
            self.want(Shape(new.workers.count, new.model))

    async def stop(self, code: int) -> None:
        """Stop accepting, let tasks finish (not when giving up), fail the rest, stop workers."""
        self.state = "stopping"
        notify.notify(stopping=1, status="stopping")
        self.front.stop_accepting()
        deadline = time.monotonic() + (self.cfg.server.stop_timeout_s if code == os.EX_OK else 0)
        while self.in_progress() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)  # polled: once, at a stop, for at most stop_timeout_s
        for slot in self.slots:
            for task in list(slot.open_tasks):
                task.fail(ErrorCode.SHUTTING_DOWN, "capsd is stopping")
        # Nothing needs the workers now: they stop while the connections close.
        await asyncio.gather(self.front.close(), self.stop_workers(), *([self.api.close()] if self.api else []))
        self.control.stop()  # status answered to the end: what a drain still holds is what operators ask
        log.info("capsd stopped", exit_code=code)

    def in_progress(self) -> bool:
        """Tasks, or API requests not yet tasks (uploading, decoding), that a stop lets finish."""
        return any(slot.open_tasks for slot in self.slots) or bool(self.api and self.api.in_progress)

    async def stop_workers(self) -> None:
        await asyncio.gather(self.loaders.stop(), *(slot.stop(timeout=5) for slot in self.slots))

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
            "loaders": self.loaders.status(),
            "memory": {
                "planned_bytes": self.plan.total_bytes,
                "available_bytes": self.plan.available_bytes,
                "worker_bytes": self.worker_bytes(self.spec),  # what growth plans per worker (alone, if forked)
                "loader_bytes": self.plan.loader_bytes,
                "worker_peak_bytes": self.peaks.get(model_key(self.spec), 0),  # measured, workers of this model
            },
            "retries": {"retried": self.retried, "poison_jobs": self.poison_jobs, "paused": self.retries_were_paused},
            "connections": len(self.front.clients),
            "intake": self.front.intake.status(),
            "api": self.api.status() if self.api else None,
            "audio_per_second": round(self.metrics.audio_per_second(), 3),
        }
