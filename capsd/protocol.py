"""CapsWriter-Offline's WebSocket protocol, sans I/O: parse client frames, build result frames.

See docs/design.md#the-protocol. Every malformed frame raises `BadRequest`, carrying the task id when it
could be read, so the caller can answer with a complete error frame and keep the connection.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
import zlib
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

RATE = 16000
# Segment parameters (docs/design.md#segmenting). The floor keeps one frame from being cut into a
# flood of tiny segments (CapsWriter sends 15 and 25): below it, bad_request. The ceiling bounds a
# worker's memory: above it, served as the ceiling, since the original server served any length.
MIN_SEG_DURATION_S = 1.0
MAX_SEG_DURATION_S = 60.0
# The longest segment a worker can be handed: seg_duration + seg_overlap, overlap < duration.
LONGEST_SEGMENT_S = 2 * MAX_SEG_DURATION_S
MAX_TASK_ID_CHARS = 256

FILE_FRAME_S = 60.0  # CapsWriter's file client sends 60 s per frame ...
FILE_SEG = (25.0, 2.0)  # ... with file_seg_duration = 25, file_seg_overlap = 2


class ErrorCode(str, Enum):
    """The `error.code` of a final frame that ends a task capsd could not complete (docs/design.md#error-frames):
    a `str`, so the frame's JSON is the bare string."""

    BAD_REQUEST = "bad_request"  # a malformed frame
    WORKER_CRASHED = "worker_crashed"  # a worker died while decoding one of the task's segments
    WORKER_HUNG = "worker_hung"  # a worker stopped answering and was killed
    WORKER_RESTARTED = "worker_restarted"  # a forced restart, or a graceful drain that timed out
    OVERLOADED = "overloaded"  # a bound was reached
    SHUTTING_DOWN = "shutting_down"  # capsd is stopping

    def __str__(self) -> str:  # in logs, metrics labels and messages: the bare string
        return self.value


def clip(text: str, limit: int = 64) -> str:
    """A client-supplied string as it may appear in a message or a log line."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class BadRequest(Exception):
    def __init__(
        self,
        message: str,
        task_id: str | None = None,
        is_final: bool = False,
        source: str = "",
        time_start: float | None = None,
    ) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.is_final = is_final
        self.source = source or "unknown"  # "mic" or "file" when the frame said so
        self.time_start = time_start  # the frame's own, when it could be read


@dataclass(frozen=True)
class AudioFrame:
    task_id: str
    source: str
    samples: np.ndarray  # float32, mono, 16 kHz
    is_final: bool
    time_start: float
    seg_duration: float  # as served: at most MAX_SEG_DURATION_S ...
    seg_overlap: float
    context: str
    language: str
    asked_seg_duration: float  # ... and as the client asked


def _number(obj: dict[str, Any], key: str, default: float | None = None) -> float:
    value = obj.get(key, default)
    if value is None:
        raise BadRequest(f"missing field {key!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"field {key!r} must be a number, not {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # a JSON integer beyond any float
        number = math.inf
    if not math.isfinite(number):
        raise BadRequest(f"field {key!r} must be finite")
    return number


def _field(obj: dict[str, Any], key: str, kind: type, default: Any = None) -> Any:
    value = obj.get(key, default)
    if value is None:
        raise BadRequest(f"missing field {key!r}")
    if not isinstance(value, kind):
        raise BadRequest(f"field {key!r} must be {kind.__name__}, not {type(value).__name__}")
    return value


def _text(obj: dict[str, Any], key: str, default: str | None = None) -> str:
    """A string field that is valid Unicode: JSON's escapes can carry a lone surrogate, which no
    UTF-8 encoder takes (docs/design.md#json-strings-that-are-not-unicode)."""
    value = _field(obj, key, str, default)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"field {key!r} is not valid Unicode (a lone surrogate)") from None
    return value


def parse_frame(raw: str | bytes) -> AudioFrame:
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: "[[[[..." nested too deep
        raise BadRequest("frame is not JSON") from None
    if not isinstance(obj, dict):
        raise BadRequest("frame is not a JSON object")
    task_id = None
    try:
        task_id = _task_id(obj)
        return _parse_task_frame(obj, task_id)
    except BadRequest as e:
        source = obj.get("source") if obj.get("source") in ("mic", "file") else ""
        raise BadRequest(str(e), task_id, obj.get("is_final") is True, source, _time_start(obj)) from None


def _task_id(obj: dict[str, Any]) -> str:
    """The frame's task id, unless it cannot be echoed faithfully (too long to keep, not valid
    Unicode): then its error frame carries task_id null."""
    task_id = obj.get("task_id")
    if not isinstance(task_id, str) or not task_id:
        raise BadRequest("field 'task_id' must be a non-empty string")
    if len(task_id) > MAX_TASK_ID_CHARS:
        raise BadRequest(f"field 'task_id' is {len(task_id)} characters long: at most {MAX_TASK_ID_CHARS}")
    return _text(obj, "task_id")


def _time_start(obj: dict[str, Any]) -> float | None:
    try:
        return _number(obj, "time_start")
    except BadRequest:
        return None


def _parse_task_frame(obj: dict[str, Any], task_id: str) -> AudioFrame:
    source = _text(obj, "source")
    if source not in ("mic", "file"):
        raise BadRequest(f"field 'source' must be 'mic' or 'file', not {clip(source)!r}")
    is_final = _field(obj, "is_final", bool)
    time_start = _number(obj, "time_start")
    asked_seg_duration = _number(obj, "seg_duration", 15)
    seg_overlap = _number(obj, "seg_overlap", 2)
    if asked_seg_duration < MIN_SEG_DURATION_S:
        raise BadRequest(f"seg_duration {asked_seg_duration:g} out of range: must be >= {MIN_SEG_DURATION_S:g}")
    seg_duration = min(asked_seg_duration, MAX_SEG_DURATION_S)
    if not 0 <= seg_overlap < seg_duration:
        raise BadRequest(
            f"seg_overlap {seg_overlap:g} out of range: must be >= 0 and < seg_duration ({seg_duration:g} served)"
        )
    context = _text(obj, "context", "")
    language = _text(obj, "language", "auto")
    if "time_frame" in obj:
        _number(obj, "time_frame")
    data = _field(obj, "data", str)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("field 'data' is not valid base64") from None
    if len(raw) % 4:
        raise BadRequest(f"audio is {len(raw)} bytes, not a multiple of 4 (float32 samples)")
    samples = np.frombuffer(raw, dtype="<f4")
    if not np.isfinite(samples).all():
        raise BadRequest("audio contains NaN or infinite samples")
    return AudioFrame(
        task_id, source, samples, is_final, time_start, seg_duration, seg_overlap, context, language, asked_seg_duration
    )


def client_frame(task_id: str, samples: np.ndarray, is_final: bool, source: str, seg: tuple[float, float]) -> str:
    """A frame as CapsWriter's clients send it (capsctl transcribe and the tests are clients)."""
    return json.dumps(
        {
            "task_id": task_id,
            "source": source,
            "data": base64.b64encode(np.asarray(samples, dtype=np.float32).tobytes()).decode(),
            "is_final": is_final,
            "time_start": time.time(),
            "seg_duration": seg[0],
            "seg_overlap": seg[1],
            "context": "",
            "language": "auto",
        }
    )


def file_frames(
    task_id: str, samples: np.ndarray, frame_s: float = FILE_FRAME_S, seg: tuple[float, float] = FILE_SEG
) -> list[str]:
    """The frames CapsWriter's file client sends for `samples`: `is_final` on the last, with audio."""
    step = round(frame_s * RATE)
    starts = list(range(0, len(samples), step)) or [0]
    return [client_frame(task_id, samples[start : start + step], start == starts[-1], "file", seg) for start in starts]


def route(task_id: str, count: int) -> int:
    """The slot owning a task: the same in every process and every run (docs/design.md#routing-is-crc32)."""
    return zlib.crc32(task_id.encode("utf-8")) % count


@dataclass
class Result:
    """What a client is told about a task so far; `to_json` gives a complete CapsWriter frame."""

    task_id: str | None
    time_start: float = 0.0
    time_submit: float = 0.0
    time_complete: float = 0.0
    duration: float = 0.0
    text: str = ""
    text_accu: str = ""
    tokens: tuple[str, ...] | list[str] = ()
    timestamps: tuple[float, ...] | list[float] = ()
    is_final: bool = False

    def to_json(self, error: tuple[ErrorCode, str] | None = None) -> str:
        frame: dict[str, Any] = {
            "task_id": self.task_id,
            "is_final": self.is_final,
            "duration": round(self.duration, 3),
            "time_start": self.time_start,
            "time_submit": self.time_submit,
            "time_complete": self.time_complete,
            "text": self.text,
            "text_accu": self.text_accu,
            "tokens": list(self.tokens),
            "timestamps": [round(t, 3) for t in self.timestamps],
        }
        if error:
            frame.update(
                is_final=True,
                text="",
                text_accu="",
                tokens=[],
                timestamps=[],
                error={"code": str(error[0]), "message": error[1]},
            )
        return json.dumps(frame, ensure_ascii=False)
