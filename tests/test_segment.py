"""capsd/segment.py: cutting a task's audio as CapsWriter does, tail included (docs/design.md#the-protocol)."""

from __future__ import annotations

import numpy as np
import pytest

from capsd.protocol import RATE
from capsd.segment import Segment, Segmenter

pytestmark = pytest.mark.unit

SETTINGS = [(15, 2), (25, 2), (3, 0.5), (2, 0), (1.5, 0.25)]


def audio(seconds: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, round(seconds * RATE)).astype(np.float32)


def stream(samples: np.ndarray, frame_s: float, seg: tuple[float, float], final_carries_audio: bool) -> list[Segment]:
    """Feed `samples` in frames of `frame_s` seconds: a mic client ends with an empty final frame,
    a file client marks its last frame, which carries audio, final (docs/design.md#how-clients-end-a-task)."""
    segmenter = Segmenter(*seg)
    step = round(frame_s * RATE)
    frames = [samples[i : i + step] for i in range(0, len(samples), step)]
    out: list[Segment] = []
    if final_carries_audio and frames:
        for f in frames[:-1]:
            out += segmenter.feed(f, is_final=False)
        out += segmenter.feed(frames[-1], is_final=True)
    else:
        for f in frames:
            out += segmenter.feed(f, is_final=False)
        out += segmenter.feed(np.zeros(0, dtype=np.float32), is_final=True)
    return out


def reassemble(segments: list[Segment]) -> np.ndarray:
    parts = [s.samples[round(s.overlap * RATE) :] for s in segments]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def check_layout(segments: list[Segment], samples: np.ndarray, seg: tuple[float, float]) -> None:
    """Indices, offsets, overlaps, lengths and content of a task's segments."""
    duration, overlap = seg
    length, stride = round((duration + overlap) * RATE), round(duration * RATE)
    assert [s.index for s in segments] == list(range(len(segments)))
    assert [s.is_last for s in segments] == [False] * (len(segments) - 1) + [True]
    for i, s in enumerate(segments):
        assert round(s.offset * RATE) == i * stride
        assert s.overlap == (overlap if i else 0.0)
        assert len(s.samples) <= length
        assert s.samples.dtype == np.float32
        start = i * stride
        assert np.array_equal(s.samples, samples[start : start + len(s.samples)])
        if not s.is_last:
            assert len(s.samples) == length
        assert s.end == pytest.approx((start + len(s.samples)) / RATE)
    assert np.array_equal(reassemble(segments), samples)


def test_a_stream_is_cut_once_duration_plus_twice_the_overlap_is_buffered() -> None:
    """CapsWriter: cut once seg_duration + 2 * seg_overlap seconds are buffered, not before."""
    segmenter = Segmenter(15, 2)
    assert segmenter.feed(audio(18.999), is_final=False) == []
    cut = segmenter.feed(audio(0.001, seed=1), is_final=False)  # now exactly 19 s
    assert len(cut) == 1
    assert (cut[0].index, cut[0].offset, cut[0].overlap, len(cut[0].samples)) == (0, 0.0, 0.0, 17 * RATE)
    assert segmenter.buffered_bytes == 4 * 4 * RATE  # 19 - 15 s kept
    assert segmenter.feed(audio(14.999, seed=2), is_final=False) == []  # 18.999 s buffered
    cut = segmenter.feed(audio(0.001, seed=3), is_final=False)
    assert [(s.index, s.offset, s.overlap, len(s.samples)) for s in cut] == [(1, 15.0, 2.0, 17 * RATE)]


@pytest.mark.parametrize("seg", SETTINGS)
def test_one_big_frame_cuts_every_segment(seg: tuple[float, float]) -> None:
    duration, overlap = seg
    samples = audio(10 * duration + 2 * overlap)
    segments = Segmenter(*seg).feed(samples, is_final=False)
    # Cut while what is left is >= duration + 2 * overlap.
    expected = 0
    left = len(samples)
    while left >= round((duration + 2 * overlap) * RATE):
        expected += 1
        left -= round(duration * RATE)
    assert len(segments) == expected == 10
    assert all(len(s.samples) == round((duration + overlap) * RATE) for s in segments)


@pytest.mark.parametrize("seg", SETTINGS)
@pytest.mark.parametrize("seconds", [0.3, 7, 17, 19, 33.7, 61, 90, 121.3])
def test_mic_and_file_frames_give_the_same_segments(seg: tuple[float, float], seconds: float) -> None:
    samples = audio(seconds)
    mic = stream(samples, 0.05, seg, final_carries_audio=False)
    mic_odd = stream(samples, 0.0371, seg, final_carries_audio=False)
    file = stream(samples, 60, seg, final_carries_audio=True)
    one = stream(samples, 1000, seg, final_carries_audio=True)  # everything in one final frame

    def key(segments: list[Segment]) -> list[tuple[int, float, float, bytes]]:
        # With seg_overlap 0 the streaming rule may cut the buffer down to nothing, leaving only
        # an empty final segment; it carries no audio, so compare what carries audio.
        return [(s.index, s.offset, s.overlap, s.samples.tobytes()) for s in segments if len(s.samples)]

    assert key(mic) == key(mic_odd) == key(file) == key(one)
    for segments in (mic, mic_odd, file, one):
        check_layout(segments, samples, seg)


@pytest.mark.parametrize("seg", SETTINGS)
def test_segments_reproduce_the_audio_whatever_the_frame_size(seg: tuple[float, float]) -> None:
    samples = audio(4 * seg[0] + 0.7)
    for frame_s in (0.1, 1, seg[0], 60):
        segments = stream(samples, frame_s, seg, final_carries_audio=True)
        check_layout(segments, samples, seg)


def test_a_long_final_frame_is_cut_into_segments_too() -> None:
    """CapsWriter's file client sends up to ~90 s in its final frame: no segment may exceed 27 s."""
    samples = audio(90)
    segments = Segmenter(25, 2).feed(samples, is_final=True)
    assert [(s.offset, s.overlap, len(s.samples) / RATE, s.is_last) for s in segments] == [
        (0.0, 0.0, 27.0, False),
        (25.0, 2.0, 27.0, False),
        (50.0, 2.0, 27.0, False),
        (75.0, 2.0, 15.0, True),
    ]
    check_layout(segments, samples, (25, 2))


def test_the_final_frame_cuts_the_tail_left_after_streaming() -> None:
    segmenter = Segmenter(25, 2)
    first = segmenter.feed(audio(60), is_final=False)
    assert [s.offset for s in first] == [0.0, 25.0]
    last = segmenter.feed(audio(30, seed=1), is_final=True)
    assert [(s.offset, len(s.samples) / RATE, s.is_last) for s in last] == [(50.0, 27.0, False), (75.0, 15.0, True)]


def test_final_tail_exactly_one_segment_long() -> None:
    segments = Segmenter(15, 2).feed(audio(17), is_final=True)
    assert [(s.offset, len(s.samples), s.is_last) for s in segments] == [(0.0, 17 * RATE, True)]


def test_an_empty_final_frame_after_audio_cuts_the_last_segment() -> None:
    segmenter = Segmenter(15, 2)
    assert segmenter.feed(audio(5), is_final=False) == []
    last = segmenter.feed(np.zeros(0, dtype=np.float32), is_final=True)
    assert [(s.index, s.offset, s.overlap, len(s.samples), s.is_last) for s in last] == [(0, 0.0, 0.0, 5 * RATE, True)]
    assert segmenter.buffered_bytes == 0


def test_empty_final_frame_after_a_cut_leaves_an_empty_last_segment() -> None:
    segmenter = Segmenter(2, 0)
    assert len(segmenter.feed(audio(4), is_final=False)) == 2  # buffer now empty
    last = segmenter.feed(np.zeros(0, dtype=np.float32), is_final=True)
    assert [(s.index, s.offset, s.overlap, len(s.samples), s.is_last) for s in last] == [(2, 4.0, 0.0, 0, True)]


def test_task_without_audio_still_gets_a_last_segment() -> None:
    last = Segmenter(15, 2).feed(np.zeros(0, dtype=np.float32), is_final=True)
    assert [(s.index, s.offset, s.overlap, len(s.samples), s.is_last) for s in last] == [(0, 0.0, 0.0, 0, True)]


def test_zero_overlap_cuts_adjacent_segments() -> None:
    samples = audio(7)
    segments = Segmenter(2, 0).feed(samples, is_final=True)
    assert [(s.offset, s.overlap, len(s.samples) / RATE) for s in segments] == [
        (0.0, 0.0, 2.0),
        (2.0, 0.0, 2.0),
        (4.0, 0.0, 2.0),
        (6.0, 0.0, 1.0),
    ]
    assert np.array_equal(np.concatenate([s.samples for s in segments]), samples)


def test_segments_do_not_alias_the_input() -> None:
    """The protocol hands read-only frombuffer arrays; segments must own their samples."""
    samples = audio(40)
    frame = np.frombuffer(samples.tobytes(), dtype=np.float32)
    segments = Segmenter(15, 2).feed(frame, is_final=True)
    for s in segments:
        assert not np.shares_memory(s.samples, frame)

def test_buffered_audio_is_counted_as_it_comes_and_goes() -> None:
    segmenter = Segmenter(15, 2)
    for _ in range(3):
        assert segmenter.feed(audio(5), is_final=False) == []
    assert segmenter.buffered_bytes == 15 * 16000 * 4
    assert len(segmenter.feed(audio(5), is_final=False)) == 1  # 20 s >= 15 + 2 * 2
    assert segmenter.buffered_bytes == 5 * 16000 * 4  # the stride of 15 s went on
    segmenter.feed(audio(0), is_final=True)
    assert segmenter.buffered_bytes == 0
