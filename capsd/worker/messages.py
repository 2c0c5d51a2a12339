"""What a slot and its worker say to each other over their pipe, one job at a time.

The worker keeps nothing between jobs (docs/design.md#stateless-workers): a `Decode` carries a
segment's samples and comes back as the segment's own tokens and timestamps; a `Format` carries
a finished task's text for the punctuation model. The supervisor merges and formats the rest.
A thread of the worker's own sends a `Beat` every `BEAT_S`, decoding or not, so the supervisor
tells a live worker from a hung one whatever the job's length (docs/design.md#deadlines).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# -- supervisor to worker ------------------------------------------------------------------------


@dataclass(frozen=True)
class Decode:
    job: int
    samples: np.ndarray  # float32, mono, 16 kHz


@dataclass(frozen=True)
class Format:
    job: int
    text: str  # to punctuate


@dataclass(frozen=True)
class Stop:
    pass


# -- worker to supervisor ------------------------------------------------------------------------


BEAT_S = 0.5  # how often a worker says it is alive; heartbeat_timeout_s is at least 1 s


@dataclass(frozen=True)
class Ready:
    pid: int
    warm_up_s: float  # the time a warm-up decode of `warm_up_audio_s` took: the first measure of speed
    warm_up_audio_s: float


@dataclass(frozen=True)
class Beat:
    pass


@dataclass(frozen=True)
class Decoded:
    job: int
    tokens: list[str]
    timestamps: list[float]  # seconds from the segment's start


@dataclass(frozen=True)
class Formatted:
    job: int
    text: str


Job = Decode | Format
Reply = Decoded | Formatted
