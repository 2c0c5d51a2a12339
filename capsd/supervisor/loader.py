"""The supervisor's side of a loader (capsd.worker.loader): one process per model that has it
loaded, from which slots get their workers by fork (docs/design.md#workers-forked-from-a-loader).

A `Loader` is like an incarnation without jobs: a process, a pipe of its own, a thread reading
it, and futures for what happens to it (`loaded`, `exited`). `fork` gives a slot an `Incarnation`
whose process is a `Forked`: the worker becomes the supervisor's child (capsd is the subreaper of
its loaders' workers), so it is reaped, killed and watched as a spawned one is.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any

import psutil
import structlog

from capsd.supervisor.policy import model_key
from capsd.supervisor.slot import Incarnation
from capsd.worker import loader
from capsd.worker.messages import Fork, Loaded, Stop, WorkerSpec

log = structlog.get_logger("capsd.loader")

_mp = multiprocessing.get_context("spawn")  # started cleanly, like a worker: never forked from the supervisor
PR_SET_CHILD_SUBREAPER = 36  # prctl(2)
STOP_TIMEOUT_S = 5.0


def become_subreaper() -> str:
    """Make the processes forked from loaders the supervisor's children; "" or why not."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        return f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(ctypes.get_errno())}"
    return ""


class Forked:
    """A worker forked by a loader, as its incarnation sees its process (slot.Process). It is the
    supervisor's child from its Ready on; until then its pid is unknown, and it is gone once its
    pipe ended (`join`). Reaped here, so a pid signalled here is never another process's."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.exitcode: int | None = None
        self.reaped = False
        self.lock = threading.Lock()  # the reader thread joins while the loop may kill

    def _reap(self) -> bool:
        """Whether it has ended and been reaped, by this call or an earlier one."""
        with self.lock:
            if self.reaped or self.pid is None:
                return self.reaped
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # it died before it became the supervisor's child
                self.reaped = True
                return True
            if pid:
                self.reaped, self.exitcode = True, os.waitstatus_to_exitcode(status)
            return self.reaped

    def is_alive(self) -> bool:
        return not self._reap()

    def kill(self) -> None:
        with self.lock:
            if self.pid is not None and not self.reaped:
                os.kill(self.pid, signal.SIGKILL)

    def join(self, timeout: float | None = None) -> None:
        if self.pid is None:  # its pipe ended before its Ready: it never served
            with self.lock:
                self.reaped = True
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._reap() and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.01)


class Loader:
    """A loader process for one model spec."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.loop = asyncio.get_running_loop()
        self.spec = spec
        self.conn, child = _mp.Pipe(duplex=True)
        self.process = _mp.Process(target=loader.main, args=(child, spec, os.getpid()), name="capsd-loader", daemon=True)
        try:
            self.process.start()
        except BaseException:
            self.conn.close()
            raise
        finally:
            child.close()
        self.pid: int = self.process.pid  # type: ignore[assignment]
        self.started = time.monotonic()
        self.ready: Loaded | None = None
        self.loaded: asyncio.Future[bool] = self.loop.create_future()
        self.exited: asyncio.Future[int | None] = self.loop.create_future()
        self.stopping = False  # stopped on purpose: not replaced
        self.gone = False  # its pipe ended (written by the reader thread)
        self.sender = ThreadPoolExecutor(1, thread_name_prefix="capsd-loader-send")
        threading.Thread(target=self._read, name="capsd-loader-read", daemon=True).start()
        log.info("loader started", pid=self.pid, model=spec.model)

    def _read(self) -> None:
        try:
            while True:
                message = self.conn.recv()
                if isinstance(message, Loaded):
                    self.loop.call_soon_threadsafe(self._loaded, message)
        except (EOFError, OSError):
            pass
        self.gone = True  # no fork is asked of it from now on, before the loop hears it ended
        self.process.join(STOP_TIMEOUT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.loop.call_soon_threadsafe(self._ended, self.process.exitcode)

    def _loaded(self, message: Loaded) -> None:
        self.ready = message
        self.loaded.set_result(True)
        log.info("loader ready", pid=self.pid, load_s=round(time.monotonic() - self.started, 2),
                 can_fork=not message.cannot_fork, **({"why": message.cannot_fork} if message.cannot_fork else {}))  # fmt: skip

    def _ended(self, exitcode: int | None) -> None:
        self.sender.submit(self.conn.close)
        self.sender.shutdown(wait=False)
        self.exited.set_result(exitcode)
        if not self.loaded.done():
            self.loaded.set_result(False)

    @property
    def can_fork(self) -> bool:
        return self.ready is not None and not self.ready.cannot_fork and not self.gone

    @property
    def state(self) -> str:
        if self.exited.done():
            return "exited"
        if self.ready is None:
            return "loading"
        return "ready" if not self.ready.cannot_fork else "cannot fork"

    def fork(self, index: int, spec: WorkerSpec) -> Incarnation:
        """A new incarnation of slot `index`, forked from this loader."""
        return Incarnation(index, spec, self._fork)

    def _fork(self, index: int, _spec: WorkerSpec, child: Connection) -> Forked:
        fd = os.dup(child.fileno())  # the incarnation closes its own copy at once
        try:
            self.sender.submit(self._send_fork, index, fd)
        except RuntimeError:  # its sender is shut down: it has ended
            os.close(fd)
            raise OSError(f"the loader (pid {self.pid}) has ended") from None
        return Forked()

    def _send_fork(self, index: int, fd: int) -> None:
        try:
            self.conn.send(Fork(index))
            reduction.send_handle(self.conn, fd, self.pid)
        except OSError:  # the loader is gone: the worker's pipe ends here, which its slot sees
            pass
        finally:
            os.close(fd)

    def kill(self) -> None:
        self.gone = True
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    async def stop(self) -> None:
        """Stop it for good: its model is no longer in use, or capsd stops. Its workers go on."""
        self.stopping = True
        if self.exited.done():
            return
        log.info("loader stopping", pid=self.pid, model=self.spec.model)
        with contextlib.suppress(RuntimeError):
            self.sender.submit(self.conn.send, Stop())
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), STOP_TIMEOUT_S)
        except asyncio.TimeoutError:
            self.kill()
            await self.exited

    def status(self) -> dict[str, Any]:
        memory = {"rss_bytes": 0, "private_bytes": 0}
        if not self.exited.done():
            with contextlib.suppress(psutil.Error):
                info = psutil.Process(self.pid).memory_full_info()
                memory = {"rss_bytes": info.rss, "private_bytes": info.uss}
        return {"pid": self.pid, "state": self.state, "model": self.spec.model,
                "uptime_s": round(time.monotonic() - self.started, 1), **memory}  # fmt: skip


class Loaders:
    """The loaders, one per model in use while workers are forked (`why_spawned` is "" then).
    Each loader's events (loaded, ended) go to `on_event`: the daemon decides what follows."""

    def __init__(self, why_spawned: str, on_event: Callable[[Loader], None], load_timeout_s: Callable[[], float]) -> None:
        self.why_spawned = why_spawned
        self.on_event = on_event
        self.load_timeout_s = load_timeout_s
        self.by_model: dict[tuple[object, ...], Loader] = {}
        self.refused: dict[tuple[object, ...], str] = {}  # models whose workers are spawned, and why
        self.restarts: Counter[tuple[object, ...]] = Counter()  # loaders replaced, per model
        if why_spawned:
            log.info("workers are spawned, each loading the model", why=why_spawned)

    def waits(self, spec: WorkerSpec) -> bool:
        """Whether a new worker of `spec` waits for its model's loader (started here if there is none)."""
        if self.why_spawned or model_key(spec) in self.refused:
            return False
        loader = self.by_model.get(model_key(spec)) or self.start(spec)
        return loader is not None and (loader.ready is None or loader.gone)  # loading, or its end not yet heard

    async def ready(self, spec: WorkerSpec) -> None:
        """Start the loader of `spec` if it has none, and wait until it has loaded or ended."""
        if self.waits(spec):
            await asyncio.shield(self.by_model[model_key(spec)].loaded)

    def forking(self, spec: WorkerSpec) -> Loader | None:
        """The loader to fork a worker of `spec` from, or None: spawn it."""
        loader = self.by_model.get(model_key(spec))
        return loader if loader is not None and loader.can_fork else None

    def start(self, spec: WorkerSpec) -> Loader | None:
        try:
            loader = Loader(spec)
        except OSError as e:
            self.refuse(spec, f"its loader cannot be started: {e}")
            return None
        self.by_model[model_key(spec)] = loader
        loader.loaded.add_done_callback(lambda _: self.on_event(loader))
        loader.exited.add_done_callback(lambda _: self._ended(loader))
        asyncio.get_running_loop().call_later(self.load_timeout_s(), self._check_loaded, loader)
        return loader

    def _check_loaded(self, loader: Loader) -> None:
        if loader.ready is None and not loader.exited.done():
            log.warning("loader not ready in time", pid=loader.pid, load_timeout_s=self.load_timeout_s())
            loader.kill()

    def _ended(self, loader: Loader) -> None:
        key = model_key(loader.spec)
        if self.by_model.get(key) is loader:
            del self.by_model[key]
        self.on_event(loader)

    def refuse(self, spec: WorkerSpec, why: str) -> None:
        """Workers of this model are spawned from now on: logged once."""
        if model_key(spec) not in self.refused:
            self.refused[model_key(spec)] = why
            log.warning("workers are spawned, not forked", model=spec.model, why=why)

    async def keep_only(self, specs: list[WorkerSpec]) -> None:
        """Stop the loaders of models no longer in use."""
        keep = {model_key(spec) for spec in specs}
        await asyncio.gather(*(loader.stop() for key, loader in list(self.by_model.items()) if key not in keep))

    async def stop(self) -> None:
        await asyncio.gather(*(loader.stop() for loader in list(self.by_model.values())))

    def status(self) -> list[dict[str, Any]]:
        return [{**loader.status(), "restarts": self.restarts[key]} for key, loader in self.by_model.items()]
