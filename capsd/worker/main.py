"""A worker process: load the recognizer, then decode segments and keep each task's partial result.

One incarnation talks to its slot over one duplex pipe made for it alone (docs/design.md#queues-wedged-by-a-killed-process: nothing a
dying process can wedge is shared with its replacement). The supervisor sends one segment at a
time and owns the queue; the worker keeps only what dies with it: the partial results.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import structlog

from capsd import log as logs
from capsd import memory, models, textformat
from capsd.merge import PartialResult, realign
from capsd.protocol import RATE
from capsd.segment import Segment

log = structlog.get_logger("capsd.worker")

# Shorter than one 25 ms fbank window: nothing to recognise, and some models (CTC) raise on it.
MIN_DECODE_SAMPLES = 400


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, picklable for the spawn start method."""

    model_type: str
    files: dict[str, Path]
    threads: int
    num: bool = True
    spell: bool = True
    punctuation: str = ""  # punctuation model dir, "" = none
    log_level: str = "info"
    log_format: str = "auto"


@dataclass(frozen=True)
class Ready:
    pid: int


@dataclass(frozen=True)
class Decoded:
    """The task's result so far, after merging one more segment."""

    key: int
    tokens: list[str]
    timestamps: list[float]
    text_accu: str
    text: str  # formatted when final
    duration: float
    is_final: bool


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

    def finish(self, partial: PartialResult) -> str:
        return textformat.format_final(
            partial.text, num=self.spec.num, spell=self.spec.spell, punctuator=self.punctuator
        )


def main(conn: Connection, spec: WorkerSpec, slot: int) -> None:
    # Ctrl-C in a terminal reaches the whole process group; the supervisor alone decides
    # when a worker stops, so a worker ignores SIGINT and ends when its pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    memory.hand_back_freed_memory()
    logs.setup(spec.log_level, spec.log_format)
    structlog.contextvars.bind_contextvars(slot=slot, pid=os.getpid())
    recognizer = Recognizer(spec)
    conn.send(Ready(os.getpid()))
    partials: dict[int, PartialResult] = {}
    while True:
        try:
            kind, key, segment = conn.recv()
        except EOFError:
            return
        if kind == "stop":
            return
        if kind == "cancel":
            partials.pop(key, None)
            continue
        assert isinstance(segment, Segment)
        tokens, timestamps = recognizer.decode(segment.samples)
        partial = partials.setdefault(key, PartialResult())
        partial.add(segment.offset, segment.overlap, tokens, timestamps, segment.end)
        if segment.is_last:
            del partials[key]
        if segment.is_last:  # text_accu formatted too, tokens realigned to it, as CapsWriter since v2.2
            text = recognizer.finish(partial)
            tokens, timestamps = realign(partial.tokens, partial.timestamps, text)
            decoded = Decoded(key, tokens, timestamps, text, text, partial.duration, True)
        else:
            decoded = Decoded(
                key, partial.tokens, partial.timestamps, partial.text, partial.text, partial.duration, False
            )
        conn.send(decoded)
