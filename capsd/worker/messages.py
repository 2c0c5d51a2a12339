"""What a slot and its worker say to each other over their pipe, one job at a time.

The worker keeps nothing between jobs (docs/design.md#stateless-workers): a `Decode` carries a
segment's samples and comes back as the segment's own tokens and timestamps; a `Format` carries
a finished task's text for the punctuation model. The supervisor merges and formats the rest.
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


@dataclass(frozen=True)
class Ready:
    pid: int


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
