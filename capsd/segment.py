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
    """One task's audio not yet cut, kept as the frames it came in: a frame costs its own size."""

    def __init__(self, seg_duration: float, seg_overlap: float) -> None:
        self.length = round((seg_duration + seg_overlap) * RATE)
        self.stride = round(seg_duration * RATE)
        self.threshold = round((seg_duration + 2 * seg_overlap) * RATE)
        self.overlap = seg_overlap
        self.chunks: list[np.ndarray] = []
        self.buffered = 0  # samples in chunks
        self.start = 0  # sample index of the first buffered sample within the task
        self.count = 0

    @property
    def buffered_bytes(self) -> int:
        return self.buffered * 4

    def clear(self) -> None:
        self.chunks, self.buffered = [], 0

    def feed(self, samples: np.ndarray, is_final: bool) -> list[Segment]:
        if len(samples):
            self.chunks.append(samples)
            self.buffered += len(samples)
        if self.buffered < self.threshold and not is_final:
            return []
        buffer = np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype=np.float32)
        out = []
        while len(buffer) >= self.threshold or (is_final and len(buffer) > self.length):
            out.append(self._cut(buffer[: self.length], is_last=False))
            buffer = buffer[self.stride :]
            self.start += self.stride
        if is_final:
            out.append(self._cut(buffer, is_last=True))
            buffer = buffer[:0]
        self.chunks = [buffer.copy()] if len(buffer) else []
        self.buffered = len(buffer)
        return out

    def _cut(self, samples: np.ndarray, is_last: bool) -> Segment:
        overlap = self.overlap if self.count else 0.0
        segment = Segment(self.count, self.start / RATE, overlap, samples.copy(), is_last)
        self.count += 1
        return segment
