"""What a slot and its worker say to each other over their pipe, one job at a time.

The worker keeps nothing between jobs (docs/design.md#stateless-workers): a `Decode` carries a
segment's samples and comes back as the segment's own tokens and timestamps; a `Format` carries
a finished task's text for the punctuation model. The supervisor merges and formats the rest.
A thread of the worker's own sends a `Beat` every `BEAT_S`, decoding or not, so the supervisor
tells a live worker from a hung one whatever the job's length (docs/design.md#deadlines).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# -- what a worker is -----------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, picklable for the spawn start method."""

    model_type: str
    files: dict[str, Path]
    threads: int
    punctuation: str = ""  # punctuation model dir, "" = none
    log_level: str = "info"
    log_format: str = "auto"
    model_dir: str = ""  # where `files` are, as status shows it

    @property
    def model(self) -> dict[str, str]:
        """The model as status shows it, per slot."""
        return {"type": self.model_type, "dir": self.model_dir, "punctuation": self.punctuation}


WARM_UP_S = 2.0  # audio decoded once at load: the slot's first measure of its worker's speed

# Shorter than one 25 ms fbank window: nothing to recognise, and some models (CTC) raise on it.
# The supervisor merges such a segment as empty without a worker; a worker answers it so too.
MIN_DECODE_SAMPLES = 400


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


@dataclass(frozen=True)
class Fork:
    """To a loader: fork a worker for `slot`; the worker's end of its pipe follows, as a descriptor."""

    slot: int


# -- worker to supervisor ------------------------------------------------------------------------


BEAT_S = 0.5  # how often a worker says it is alive; heartbeat_timeout_s is at least 1 s


@dataclass(frozen=True)
class Ready:
    pid: int
    warm_up_s: float  # the time a warm-up decode of `warm_up_audio_s` took: the first measure of speed
    warm_up_audio_s: float


@dataclass(frozen=True)
class Loaded:
    """From a loader: the model is loaded and warmed up; `cannot_fork` says why no worker can be
    forked from it ("" = it can)."""

    pid: int
    warm_up_s: float
    warm_up_audio_s: float
    cannot_fork: str = ""


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
