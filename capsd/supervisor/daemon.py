"""The supervisor: start the slots, serve, watch the workers, stop gracefully.

Its loop reads as a list of duties, like gunicorn's arbiter: `start_slots`, `watch_workers`
(hung and bloated workers), `count_crash` (restart intensity, OTP style), `stop`.
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
from datetime import datetime, timezone

import structlog

from capsd import __version__
from capsd import log as logs
from capsd.config import Config, ConfigError
from capsd.preflight import Preflight
from capsd.protocol import clip
from capsd.supervisor import control, notify
from capsd.supervisor.front import Front
from capsd.supervisor.metrics import Metrics
from capsd.supervisor.slot import ExitReason, Incarnation, LastExit, Slot, SlotState
from capsd.supervisor.task import Formatting, Task

log = structlog.get_logger("capsd.supervisor")

WATCH_INTERVAL_S = 0.5
# A worker that cannot be spawned is tried again after 0.5, 1, 2 ... s, at most 30 s apart.
SPAWN_RETRY_S, SPAWN_RETRY_MAX_S = 0.5, 30.0
# What SIGHUP can change in a running daemon; anything else needs a restart.
RELOADABLE = {
    "server": {"max_connections", "stop_timeout_s"},
    "workers": {"max_rss_mb", "heartbeat_timeout_s", "restart_intensity", "restart_period_s", "queue_limit",
                "load_timeout_s"},
    "log": {"level", "format"},
}


class Daemon:
    def __init__(self, cfg: Config, preflight: Preflight, reload: Callable[[], Config]) -> None:
        self.cfg = cfg
        self.reload = reload
        self.plan = preflight.plan
        self.started = time.monotonic()
        self.state = "starting"
        self.crashes: deque[float] = deque()
        self.loop_errors, self.loop_error_logged = 0, 0.0
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.metrics = Metrics(self.status)
        self.slots = [
            Slot(i, preflight.spec, cfg.workers.queue_limit, cfg.workers.work_stealing, self.worker_exited, self.metrics)
            for i in range(cfg.workers.count)
        ]
        for slot in self.slots:
            slot.peers = self.slots
        formatting = Formatting(cfg.format.num, cfg.format.spell, punctuate=bool(preflight.spec.punctuation))
        self.front = Front(cfg.server, self.slots, formatting, self.not_ready, self.metrics)
        self.control = control.ControlServer(cfg.control.socket, self)

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
            return os.EX_CONFIG
        watcher = asyncio.create_task(self.watch_workers())
        runners = [asyncio.create_task(slot.run()) for slot in self.slots]
        for runner in runners:
            runner.add_done_callback(self.runner_ended)
        code = await self.start_slots()
        if code is None:
            self.state = "ready"
            log.info("memory plan", plan=self.plan.message())
            log.info("capsd ready", slots=len(self.slots), version=__version__, config=self.cfg.source)
            notify.notify(ready=1, status=self.summary())
            code = await self.done
        watcher.cancel()
        await self.stop(code)
        for runner in runners:
            runner.cancel()
        return code

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
        # would loop forever, so refuse to start, like uvicorn's STARTUP_FAILURE.
        slot.failed = True
        log.error("startup failed", slot=slot.index, reason=reason)
        self.finish(os.EX_CONFIG)

    def start_worker(self, slot: Slot, attempt: int = 0) -> None:
        """Start the slot's worker; one that cannot be spawned (descriptors, processes, memory)
        is tried again after 0.5, 1, 2 ... s, each failure counted against restart intensity."""
        if slot.stopping or self.done.done():
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
            asyncio.get_running_loop().call_later(delay, self.start_worker, slot, attempt + 1)

    def check_loaded(self, slot: Slot, inc: Incarnation) -> None:
        """load_timeout_s after a worker started: one still loading is killed, as a crash."""
        if slot.incarnation is inc and not inc.ready:
            log.warning("worker not ready in time", slot=slot.index, pid=inc.pid, load_timeout_s=self.cfg.workers.load_timeout_s)
            slot.kill(ExitReason.NOT_LOADED)

    def worker_exited(self, slot: Slot, reason: ExitReason, exitcode: int | None, lost: Task | None) -> None:
        """Every restart decision, in one place: what the exit costs, and what comes next."""
        pid = slot.incarnation.pid if slot.incarnation else None
        if not slot.ever_ready:
            loading = f"was not ready within load_timeout_s = {self.cfg.workers.load_timeout_s:g} s"
            cause = loading if reason is ExitReason.NOT_LOADED else "died while loading the model"
            self.startup_failed(slot, f"the worker of slot {slot.index} {cause} (exit code {exitcode})")
            return
        slot.last_exit = LastExit(reason.reported, exitcode, datetime.now(timezone.utc).isoformat(timespec="seconds"))
        slot.restarts += 1
        self.metrics.restarts.labels(str(slot.index), reason.reported).inc()
        level = log.info if not reason.counts and lost is None else log.warning
        level("worker exited", slot=slot.index, pid=pid, reason=reason.value, exitcode=exitcode,
              lost_tasks=[clip(lost.task_id)] if lost else [])  # fmt: skip
        if lost is not None:
            lost.fail(reason.code, f"the worker of slot {slot.index} ended ({reason.value}, exit code {exitcode})")
        if reason.counts:
            self.count_crash(slot)
        self.start_worker(slot)

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
            for slot in self.slots:
                slot.sample_cpu(now)
                self.check_worker(slot, now)
            ping = watchdog is not None and now - last_ping >= watchdog
            status = self.summary()
            if ping or status != last_status:
                notify.notify(status=status, **({"watchdog": 1} if ping else {}))
                last_status, last_ping = status, now if ping else last_ping
            await asyncio.sleep(WATCH_INTERVAL_S)

    def check_worker(self, slot: Slot, now: float) -> None:
        workers, inc = self.cfg.workers, slot.incarnation
        if inc is None or not inc.ready:
            return
        if slot.in_flight and now - slot.busy_since > workers.heartbeat_timeout_s:
            log.warning("worker hung", slot=slot.index, pid=inc.pid, busy_s=round(now - slot.busy_since, 1))
            slot.kill(ExitReason.HUNG)
            return
        if slot.drain_reason and now > slot.drain_deadline:
            log.warning("drain timed out: forcing the restart", slot=slot.index, pid=inc.pid,
                        reason=slot.drain_reason.value)  # fmt: skip
            slot.kill(slot.drain_reason)
            return
        if not inc.jobs:  # a fresh worker is as small as it gets: recycling it would loop
            return
        rss = inc.rss()
        if rss > self.plan.worker_bytes and not inc.over_plan:
            inc.over_plan = True
            log.warning("worker above its memory estimate", slot=slot.index, pid=inc.pid, rss_mb=rss >> 20,
                        estimate_mb=self.plan.worker_bytes >> 20)  # fmt: skip
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
        """Reread the config; apply what can change while running, say what cannot."""
        try:
            new = self.reload()
        except ConfigError as e:
            log.error("reload refused: keeping the running config", reason=str(e))
            return
        applied, kept = [], []
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
            kept += [f"[{section}] {k}" for k in changes if k not in allowed]
            sections[section] = dataclasses.replace(old_values, **allowed)
        self.cfg = dataclasses.replace(self.cfg, **sections)
        self.front.cfg = self.cfg.server
        for slot in self.slots:
            slot.set_queue_limit(self.cfg.workers.queue_limit)
        logs.setup(self.cfg.log.level, self.cfg.log.format)
        log.info("config reloaded", applied=applied or "nothing changed")
        if kept:
            log.warning("config changes need a restart: systemctl restart capsd", not_applied=kept)

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
                task.fail("shutting_down", "capsd is stopping")
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
        return f"{ready}/{len(self.slots)} slots ready, {tasks} tasks in progress, {restarts} restarts"

    def status(self) -> dict[str, object]:
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "version": __version__,
            "state": self.state,
            "slots": [slot.status() for slot in self.slots],
            "memory": {"planned_bytes": self.plan.total_bytes, "available_bytes": self.plan.available_bytes},
            "connections": len(self.front.clients),
            "audio_per_second": round(self.metrics.audio_per_second(), 3),
        }
