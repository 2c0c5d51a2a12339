"""What the OpenAI-compatible API answers, sans I/O: request fields checked, results shaped as
OpenAI's (json, text, srt, vtt, verbose_json, stream events), errors in OpenAI's shape.

The official SDKs are the reference client (docs/design.md#the-openai-compatible-api): `json` is
exactly `{"text": ...}`; `text`, `srt` and `vtt` are raw text bodies, never JSON-quoted.
Word times come from the model's token timestamps: a "word" is one unit of the final text (a
Latin word, or one CJK character or digit), timed by the token it was recognised as.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from capsd import textformat
from capsd.merge import join_tokens
from capsd.protocol import ErrorCode

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
STREAMED_FORMATS = ("json", "text")  # stream=true sends text events: the formats that are text alone
GRANULARITIES = ("word", "segment")
MAX_LANGUAGE_CHARS = 64
# A word ends where the next begins, but lasts at most this long (the last one: to the audio's end).
MAX_WORD_S = 1.0
# A segment (a subtitle) ends at a sentence's end, before a pause this long between two words'
# starts, or once it is this long.
SEGMENT_PAUSE_S = 1.0
MAX_SEGMENT_S = 15.0
SENTENCE_END = set("。！？!?.")
# What an error status is to OpenAI's SDKs, as their `type`.
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error"}  # fmt: skip
# A task's error code (the WebSocket protocol's) as an HTTP status (docs/design.md#errors-in-openais-shape).
TASK_ERROR_STATUS = {
    ErrorCode.BAD_REQUEST.value: 400,
    ErrorCode.WORKER_CRASHED.value: 500,
    ErrorCode.WORKER_HUNG.value: 500,
    ErrorCode.WORKER_RESTARTED.value: 500,
    ErrorCode.OVERLOADED.value: 429,
    ErrorCode.SHUTTING_DOWN.value: 503,
}


class ApiError(Exception):
    """An answer in OpenAI's error shape. `retry_after` (seconds) goes out as Retry-After;
    `final`: a retry cannot help (x-should-retry: false, which the SDKs obey)."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 retry_after: int | None = None, final: bool = False) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after
        self.final = final

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.code, self.param)

    def headers(self) -> dict[str, str]:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        return {**headers, "x-should-retry": "false"} if self.final else headers


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}`, every key present, as OpenAI sends it."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code, param)


@dataclass(frozen=True)
class Params:
    """The fields of a transcription request, checked. `language`, `prompt` and `temperature`
    are accepted and not used: capsd's models take no such hints (README, The OpenAI-compatible API)."""

    model: str
    response_format: str = "json"
    granularities: frozenset[str] = frozenset()
    language: str = ""
    prompt: str = ""
    temperature: float = 0.0
    stream: bool = False

    @property
    def words(self) -> bool:
        return "word" in self.granularities

    @property
    def segments(self) -> bool:
        """OpenAI's rule: segments unless only words were asked for."""
        return not self.granularities or "segment" in self.granularities


def parse_params(fields: Mapping[str, list[str]]) -> Params:
    """The text fields of a multipart request (each name with its values, in order); ApiError 400
    naming the field that is wrong. Fields OpenAI knows and capsd does not use are ignored."""

    def one(name: str, default: str | None = None) -> str | None:
        values = fields.get(name)
        return values[-1] if values else default

    model = one("model")
    if not model:
        raise bad("you must provide a model parameter", "model", "missing_required_parameter")
    response_format = one("response_format", "json") or "json"
    if response_format not in FORMATS:
        raise bad(f"response_format {response_format[:40]!r} is not supported: one of {', '.join(FORMATS)}",
                  "response_format")  # fmt: skip
    granularities = fields.get("timestamp_granularities[]", []) + fields.get("timestamp_granularities", [])
    if unknown := [g for g in granularities if g not in GRANULARITIES]:
        raise bad(f"timestamp_granularities[] {unknown[0][:40]!r} is not supported: word or segment",
                  "timestamp_granularities[]")  # fmt: skip
    if granularities and response_format != "verbose_json":
        raise bad("timestamp_granularities[] is only supported with response_format verbose_json",
                  "timestamp_granularities[]")  # fmt: skip
    stream_text = (one("stream", "false") or "false").lower()
    if stream_text not in ("true", "false"):
        raise bad(f"stream {stream_text[:40]!r} is not a boolean: true or false", "stream")
    stream = stream_text == "true"
    if stream and response_format not in STREAMED_FORMATS:
        raise bad(f"stream=true sends text events: response_format {' or '.join(STREAMED_FORMATS)}, "
                  f"not {response_format}", "stream")  # fmt: skip
    language = one("language", "") or ""
    if len(language) > MAX_LANGUAGE_CHARS:
        raise bad(f"language is {len(language)} characters long: at most {MAX_LANGUAGE_CHARS}", "language")
    temperature_text = one("temperature", "0") or "0"
    try:
        temperature = float(temperature_text)
    except ValueError:
        raise bad(f"temperature {temperature_text[:40]!r} is not a number", "temperature") from None
    if not (math.isfinite(temperature) and 0 <= temperature <= 1):
        raise bad(f"temperature {temperature_text[:40]!r} is out of range: 0 to 1", "temperature")
    return Params(model, response_format, frozenset(granularities), language, one("prompt", "") or "", temperature,
                  stream)  # fmt: skip


@dataclass(frozen=True)
class Transcript:
    """A task's final result: its formatted text, the units of that text with their start times
    (the final frame's realigned tokens), and the audio's duration in seconds."""

    text: str
    tokens: list[str]
    timestamps: list[float]
    duration: float


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float


@dataclass(frozen=True)
class Segment:
    id: int
    start: float
    end: float
    text: str


def words(t: Transcript) -> list[Word]:
    """Each unit of the text, from its token's time to the next one's (at most MAX_WORD_S)."""
    out = []
    for i, (unit, start) in enumerate(zip(t.tokens, t.timestamps)):
        after = t.timestamps[i + 1] if i + 1 < len(t.timestamps) else max(t.duration, start)
        out.append(Word(unit, round(start, 3), round(max(start, min(after, start + MAX_WORD_S)), 3)))
    return out


def segments(t: Transcript, ws: list[Word]) -> list[Segment]:
    """The words grouped into subtitles: split at a sentence's end, a pause, or MAX_SEGMENT_S;
    each segment's text is its stretch of the final text."""
    spans = _unit_spans(t.text, [w.word for w in ws])
    groups: list[list[int]] = []
    for i, w in enumerate(ws):
        if groups:
            first, last = ws[groups[-1][0]], ws[groups[-1][-1]]
            ended = last.word[-1:] in SENTENCE_END
            if not (ended or w.start - last.start >= SEGMENT_PAUSE_S or w.end - first.start > MAX_SEGMENT_S):
                groups[-1].append(i)
                continue
        groups.append([i])
    return [
        Segment(n, ws[g[0]].start, ws[g[-1]].end, t.text[spans[g[0]][0] : spans[g[-1]][1]].strip())
        for n, g in enumerate(groups)
    ]


def _unit_spans(text: str, units: list[str]) -> list[tuple[int, int]]:
    """Where each unit lies in the text (units are the text's, in order)."""
    spans, at = [], 0
    for unit in units:
        start = text.find(unit, at)
        start = at if start < 0 else start
        at = start + len(unit)
        spans.append((start, at))
    return spans


def _clock(seconds: float, mark: str) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{mark}{ms % 1000:03d}"


def srt(segs: Iterable[Segment]) -> str:
    return "".join(f"{s.id + 1}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text}\n\n" for s in segs)


def vtt(segs: Iterable[Segment]) -> str:
    return "WEBVTT\n\n" + "".join(f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text}\n\n" for s in segs)


def verbose(t: Transcript, params: Params) -> dict[str, Any]:
    """OpenAI's verbose_json: `segments` unless only words were asked for, `words` when asked for.
    The fields of a segment that describe Whisper's decoding are given neutral values."""
    ws = words(t)
    body: dict[str, Any] = {"task": "transcribe", "language": params.language or "auto",
                            "duration": round(t.duration, 3), "text": t.text}  # fmt: skip
    if params.segments:
        body["segments"] = [
            {"id": s.id, "seek": 0, "start": s.start, "end": s.end, "text": s.text, "tokens": [],
             "temperature": params.temperature, "avg_logprob": 0.0, "compression_ratio": 1.0, "no_speech_prob": 0.0}
            for s in segments(t, ws)
        ]  # fmt: skip
    if params.words:
        body["words"] = [{"word": w.word, "start": w.start, "end": w.end} for w in ws]
    body["usage"] = {"type": "duration", "seconds": math.ceil(t.duration)}
    return body


def render(t: Transcript, params: Params) -> tuple[str, str]:
    """The body of a (not streamed) answer and its content type."""
    fmt = params.response_format
    if fmt == "json":
        return json.dumps({"text": t.text}, ensure_ascii=False), "application/json"
    if fmt == "verbose_json":
        return json.dumps(verbose(t, params), ensure_ascii=False), "application/json"
    if fmt == "text":
        return t.text + "\n", "text/plain; charset=utf-8"
    ws = words(t)
    if fmt == "srt":
        return srt(segments(t, ws)), "application/x-subrip; charset=utf-8"
    return vtt(segments(t, ws)), "text/vtt; charset=utf-8"


def event(data: Mapping[str, Any]) -> bytes:
    """One server-sent event."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


# The characters formatting may still change when more text follows (textformat's numeral runs,
# 百分之, 点): a streamed prefix stops before them.
_UNSETTLED = set(textformat._DIGITS) | set(textformat._UNITS) | set("点分之")
_LONGEST_IDIOM = max(map(len, textformat._IDIOMS))


@dataclass
class Deltas:
    """The text deltas of a streamed answer (docs/design.md#streaming): each a piece of the final
    text, so that they add up to it. Only tokens no later segment can change are streamed (before
    the next overlap's cut: `settled_s` before the merged audio's end), formatted, and only up to a
    point after which no later character can change their formatting."""

    num: bool
    spell: bool
    punctuate: bool
    settled_s: float
    sent: str = ""
    pieces: list[str] = field(default_factory=list)

    def partial(self, tokens: list[str], timestamps: list[float], duration: float) -> str:
        """The delta a partial result allows now ("" for none)."""
        if self.punctuate:  # a worker punctuates the whole text at its end
            return ""
        settled = join_tokens([tok for tok, t in zip(tokens, timestamps) if t < duration - self.settled_s])
        raw = self._settled_prefix(settled) if self.num else settled
        return self._advance(textformat.format_final(raw, num=self.num, spell=self.spell, punctuator=None))

    def final(self, text: str) -> str:
        return self._advance(text)

    def _settled_prefix(self, raw: str) -> str:
        """`raw` up to its last character that ends no numeral run and no start of an idiom."""
        end = len(raw)
        while end:
            while end and raw[end - 1] in _UNSETTLED:
                end -= 1
            tail = raw[max(0, end - _LONGEST_IDIOM) : end]
            if not any(idiom.startswith(tail[k:]) for idiom in textformat._IDIOMS for k in range(len(tail))):
                break
            end -= 1
        return raw[:end].rstrip()

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) == len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        self.pieces.append(delta)
        return delta
