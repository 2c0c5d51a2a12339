"""A worker process: load the recognizer, then do one job at a time and keep nothing between jobs.

One incarnation talks to its slot over one duplex pipe made for it alone
(docs/design.md#queues-wedged-by-a-killed-process). A job is a segment to decode or a finished
text to punctuate (`capsd.worker.messages`); the supervisor owns every task's state, so a dead
worker loses only the job it was doing (docs/design.md#stateless-workers).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import structlog

from capsd import lifeline, memory, models, textformat
from capsd import log as logs
from capsd.protocol import RATE
from capsd.worker.messages import (
    BEAT_S,
    MIN_DECODE_SAMPLES,
    WARM_UP_S,
    Beat,
    Decode,
    Decoded,
    Format,
    Formatted,
    Ready,
    WorkerSpec,
)

log = structlog.get_logger("capsd.worker")



class Recognizer:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.recognizer = models.create_recognizer(spec.model_type, spec.files, spec.threads)
        self.punctuator = textformat.Punctuator(Path(spec.punctuation), spec.threads) if spec.punctuation else None

    def decode(self, samples: np.ndarray) -> tuple[list[str], list[float]]:
        if len(samples) < MIN_DECODE_SAMPLES:
            return [], []
        stream = self.recognizer.create_stream()
        stream.accept_waveform(RATE, samples)
        try:
            self.recognizer.decode_stream(stream)
        except RuntimeError as e:  # onnxruntime refusing this input: no words, not a dead worker
            log.error("decoding failed", samples=len(samples), error=str(e))
            return [], []
        tokens, timestamps = list(stream.result.tokens), list(stream.result.timestamps)
        if len(timestamps) != len(tokens):
            # Some models give no timestamps: spread the tokens over the segment so merging
            # by time still keeps each overlap's tokens once.
            step = len(samples) / RATE / max(len(tokens), 1)
            timestamps = [i * step for i in range(len(tokens))]
        return tokens, timestamps

    def punctuate(self, text: str) -> str:
        return self.punctuator(text) if self.punctuator is not None and text else text


def warm_up(recognizer: Recognizer) -> float:
    """Decode WARM_UP_S of a tone once; returns the seconds it took (docs/design.md#deadlines)."""
    t = np.arange(int(WARM_UP_S * RATE), dtype=np.float32) / RATE
    started = time.monotonic()
    recognizer.decode((0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
    return time.monotonic() - started


class Pipe:
    """The worker's end of its pipe: replies from the main thread, beats from a thread of their own."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, message: object) -> None:
        try:
            with self.lock:
                self.conn.send(message)
        except OSError:  # the supervisor is gone: end at once, quietly
            os._exit(0)

    def beat(self) -> None:
        while True:
            self.send(Beat())
            time.sleep(BEAT_S)


def start(spec: WorkerSpec, supervisor: int, **context: object) -> None:
    """What a process started by the supervisor (a worker or a loader) does first."""
    lifeline.end_with(supervisor)  # a worker must not decode on for a supervisor that is gone
    # Ctrl-C in a terminal reaches the whole process group; the supervisor alone decides
    # when a worker stops, so a worker ignores SIGINT and ends when its pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A hung worker gets SIGABRT before SIGKILL: the journal then shows where it was stuck.
    faulthandler.enable(all_threads=True)
    memory.hand_back_freed_memory()
    logs.setup(spec.log_level, spec.log_format)
    structlog.contextvars.bind_contextvars(pid=os.getpid(), **context)


def load(spec: WorkerSpec) -> Recognizer:
    try:
        return Recognizer(spec)
    except (RuntimeError, OSError, ValueError) as e:  # a model that passed the checks but does not load
        log.error("cannot load the model", model=spec.model, error=str(e))
        sys.exit(1)  # one line in the log, not a traceback; the supervisor sees the exit


def main(conn: Connection, spec: WorkerSpec, slot: int, supervisor: int) -> None:
    """A spawned worker: a process of its own that loads the model itself."""
    start(spec, supervisor, slot=slot)
    recognizer = load(spec)
    serve(conn, recognizer, Ready(os.getpid(), warm_up(recognizer), WARM_UP_S))


def serve(conn: Connection, recognizer: Recognizer, ready: Ready) -> None:
    """Say it is ready, then do jobs until Stop or the end of the pipe: a spawned worker and
    one forked from a loader alike (docs/design.md#workers-forked-from-a-loader)."""
    pipe = Pipe(conn)
    pipe.send(ready)
    threading.Thread(target=pipe.beat, name="capsd-beat", daemon=True).start()
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if isinstance(job, Decode):
            pipe.send(Decoded(job.job, *recognizer.decode(job.samples)))
        elif isinstance(job, Format):
            pipe.send(Formatted(job.job, recognizer.punctuate(job.text)))
        else:
            return  # Stop
