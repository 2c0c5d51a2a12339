"""Cutting one task's audio into overlapping segments, as CapsWriter-Offline does.

While audio streams in, a segment of `seg_duration + seg_overlap` seconds is cut with a stride
of `seg_duration` once `seg_duration + 2 * seg_overlap` seconds are buffered (CapsWriter's
rule). At the end CapsWriter sends everything left as one segment (up to ~90 s from its file
client); capsd cuts that tail the same way, so no segment is ever longer than
`seg_duration + seg_overlap`: that bounds a worker's memory and anyone's wait behind it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from capsd.protocol import RATE


@dataclass(frozen=True)
class Segment:
    index: int
    offset: float  # seconds from the task's start
    overlap: float  # seconds this segment shares with the previous one (0 for the first)
    samples: np.ndarray
    is_last: bool

    @property
    def end(self) -> float:
        return self.offset + len(self.samples) / RATE


class Segmenter:
    def __init__(self, seg_duration: float, seg_overlap: float) -> None:
        self.length = round((seg_duration + seg_overlap) * RATE)
        self.stride = round(seg_duration * RATE)
        self.threshold = round((seg_duration + 2 * seg_overlap) * RATE)
        self.overlap = seg_overlap
        self.buffer = np.zeros(0, dtype=np.float32)
        self.start = 0  # sample index of buffer[0] within the task
        self.count = 0

    @property
    def buffered_bytes(self) -> int:
        return self.buffer.nbytes

    def clear(self) -> None:
        self.buffer = self.buffer[:0]

    def feed(self, samples: np.ndarray, is_final: bool) -> list[Segment]:
        self.buffer = np.concatenate([self.buffer, samples]) if len(self.buffer) else samples.copy()
        out = []
        while len(self.buffer) >= self.threshold or (is_final and len(self.buffer) > self.length):
            out.append(self._cut(self.buffer[: self.length], is_last=False))
            self.buffer = self.buffer[self.stride :]
            self.start += self.stride
        if is_final:
            out.append(self._cut(self.buffer, is_last=True))
            self.buffer = np.zeros(0, dtype=np.float32)
        return out

    def _cut(self, samples: np.ndarray, is_last: bool) -> Segment:
        overlap = self.overlap if self.count else 0.0
        segment = Segment(self.count, self.start / RATE, overlap, samples.copy(), is_last)
        self.count += 1
        return segment
