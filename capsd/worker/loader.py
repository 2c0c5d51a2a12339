"""A loader: one process per model that loads it once and forks a worker whenever the supervisor
asks, so that N workers share one copy of the weights (docs/design.md#workers-forked-from-a-loader).

The loader is spawned like a worker, loads the model with one onnxruntime thread (which then
starts no thread pool) and decodes once to warm up. It runs no thread of its own: if the process
has more than one thread when the model is loaded, forking it is not safe, and the loader says so
instead (`Loaded.cannot_fork`); the supervisor then spawns workers as before.

A worker is forked twice over: the loader forks a child that forks the worker and exits at once,
so the worker is reparented to the supervisor, capsd's subreaper. The supervisor then is its
parent, as it is of a spawned worker: it reaps it, reads its exit code, and kills it without
fear of a reused pid. The worker talks to the supervisor over the pipe whose end the supervisor
sent with `Fork` (SCM_RIGHTS), exactly as a spawned worker does, and ends with `os._exit`.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import traceback
from multiprocessing import reduction
from multiprocessing.connection import Connection

import structlog

from capsd import lifeline
from capsd.worker import main as worker
from capsd.worker.messages import WARM_UP_S, Fork, Loaded, Ready, WorkerSpec

log = structlog.get_logger("capsd.loader")

REPARENT_TIMEOUT_S = 10.0  # a forked worker waits this long at most to become the supervisor's child


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def main(conn: Connection, spec: WorkerSpec, supervisor: int) -> None:
    worker.start(spec, supervisor, loader=spec.model_dir)
    recognizer = worker.load(spec)
    warm_up_s = worker.warm_up(recognizer)
    # What the model made stays where it is: the collector would touch (and so copy) every
    # object in every worker (docs/design.md#workers-forked-from-a-loader).
    gc.freeze()
    running = threads()
    cannot_fork = f"the loader runs {running} threads, and forking it is only safe with one" if running > 1 else ""
    conn.send(Loaded(os.getpid(), warm_up_s, WARM_UP_S, cannot_fork))
    if cannot_fork:
        return
    while True:
        try:
            message = conn.recv()
            if not isinstance(message, Fork):  # Stop
                return
            fd = reduction.recv_handle(conn)
        except (EOFError, OSError):  # the supervisor is gone, or stops it
            return
        fork(conn, fd, message.slot, supervisor, recognizer, warm_up_s)


def fork(conn: Connection, fd: int, slot: int, supervisor: int, recognizer: worker.Recognizer, warm_up_s: float) -> None:
    """Fork a worker for `slot` serving the pipe `fd`; the loader keeps no copy of that pipe, so
    the supervisor sees the worker's end (or a fork that failed) as the end of its pipe."""
    try:
        child = os.fork()
    except OSError as e:
        log.error("cannot fork a worker", slot=slot, error=str(e))
        os.close(fd)
        return
    if child == 0:
        try:
            if os.fork() == 0:
                forked(conn, fd, slot, supervisor, recognizer, warm_up_s)
        finally:
            os._exit(0)  # the middle process: its child, the worker, goes to the subreaper
    os.close(fd)
    os.waitpid(child, 0)


def forked(conn: Connection, fd: int, slot: int, supervisor: int, recognizer: worker.Recognizer, warm_up_s: float) -> None:
    """The worker, in the loader's copy (its warm-up measured the speed of both): never returns."""
    code = 0
    try:
        conn.close()  # the loader's pipe is the loader's alone: its end shows the loader's death
        deadline = time.monotonic() + REPARENT_TIMEOUT_S
        while os.getppid() != supervisor:  # until the middle process is gone
            if time.monotonic() > deadline:
                raise OSError(f"not reparented to the supervisor (pid {supervisor}) within {REPARENT_TIMEOUT_S:g} s")
            time.sleep(0.001)
        lifeline.end_with(supervisor)
        structlog.contextvars.bind_contextvars(slot=slot, pid=os.getpid())
        structlog.contextvars.unbind_contextvars("loader")
        worker.serve(Connection(fd), recognizer, Ready(os.getpid(), warm_up_s, WARM_UP_S))
    except BaseException as e:  # noqa: BLE001  # whatever it is, never back into the loader's loop
        code = 1
        log.error("forked worker failed", error=repr(e))
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
