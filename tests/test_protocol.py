"""capsd/protocol.py: CapsWriter frames in, result frames out (docs/design.md#the-protocol)."""

from __future__ import annotations

import base64
import json
import zlib
from typing import Any

import numpy as np
import pytest

from capsd.protocol import BadRequest, Result, parse_frame, route

pytestmark = pytest.mark.unit

# Every key a CapsWriter client reads from a final frame without .get() (docs/design.md#old-clients-read-every-key).
CLIENT_KEYS = (
    "task_id",
    "is_final",
    "duration",
    "time_start",
    "time_submit",
    "time_complete",
    "text",
    "text_accu",
    "tokens",
    "timestamps",
)


def b64(samples: Any) -> str:
    return base64.b64encode(np.asarray(samples, dtype="<f4").tobytes()).decode()


def frame(**fields: Any) -> str:
    """A CapsWriter mic frame as its client sends it, with `fields` changed; None removes a field."""
    obj: dict[str, Any] = {
        "task_id": "3f2a-task",
        "seg_duration": 15,
        "seg_overlap": 2,
        "is_final": False,
        "time_start": 1718000000.25,
        "time_frame": 1718000000.5,
        "source": "mic",
        "data": b64([0.0, 0.5, -0.25]),
        "context": "",
        "language": "auto",
    }
    obj.update(fields)
    return json.dumps({k: v for k, v in obj.items() if v is not None})


def bad(raw: str | bytes) -> BadRequest:
    with pytest.raises(BadRequest) as e:
        parse_frame(raw)
    return e.value


def test_good_frame_round_trips_samples() -> None:
    samples = np.array([0.0, 1.0, -1.0, 0.123456789, 3.4e38, -1e-30], dtype=np.float32)
    f = parse_frame(frame(data=b64(samples), is_final=True, source="file", context="热词", language="zh"))
    assert f.task_id == "3f2a-task"
    assert f.source == "file"
    assert f.is_final is True
    assert f.time_start == 1718000000.25
    assert f.seg_duration == 15.0 and f.seg_overlap == 2.0
    assert f.context == "热词" and f.language == "zh"
    assert f.samples.dtype == np.float32
    assert f.samples.tobytes() == samples.tobytes()


def test_a_frame_sent_as_bytes_is_accepted() -> None:
    assert parse_frame(frame().encode()).task_id == "3f2a-task"


def test_empty_data_is_an_empty_frame() -> None:
    f = parse_frame(frame(data="", is_final=True))
    assert len(f.samples) == 0
    assert f.is_final


def test_optional_fields_take_capswriters_defaults() -> None:
    f = parse_frame(frame(seg_duration=None, seg_overlap=None, context=None, language=None, time_frame=None))
    assert (f.seg_duration, f.seg_overlap, f.context, f.language) == (15.0, 2.0, "", "auto")


def test_segment_values_may_be_floats() -> None:
    f = parse_frame(frame(seg_duration=60, seg_overlap=0))
    assert (f.seg_duration, f.seg_overlap) == (60.0, 0.0)
    f = parse_frame(frame(seg_duration=1.5, seg_overlap=0.25))
    assert (f.seg_duration, f.seg_overlap) == (1.5, 0.25)
    f = parse_frame(frame(seg_duration=1, seg_overlap=0.999))
    assert (f.seg_duration, f.seg_overlap) == (1.0, 0.999)


@pytest.mark.parametrize("seg_duration", [1e-05, 0.001, 0.5, 0.999])
def test_seg_duration_below_one_second_is_refused(seg_duration: float) -> None:
    """A stride of a few samples would cut one frame into thousands of segments."""
    e = bad(frame(seg_duration=seg_duration, seg_overlap=0, data="", is_final=True))
    assert "seg_duration" in str(e) and e.task_id == "3f2a-task" and e.is_final


@pytest.mark.parametrize("asked", [60.5, 90, 1000, 10**300])
def test_seg_duration_above_60_is_served_as_60(asked: float) -> None:
    """CapsWriter's own server served any length; capsd serves at most 60 s (docs/design.md#segmenting)."""
    f = parse_frame(frame(seg_duration=asked, seg_overlap=2))
    assert (f.seg_duration, f.asked_seg_duration, f.seg_overlap) == (60.0, float(asked), 2.0)
    f = parse_frame(frame(seg_duration=90, seg_overlap=59.5))
    assert (f.seg_duration, f.seg_overlap) == (60.0, 59.5)


def test_seg_duration_within_range_is_served_as_asked() -> None:
    f = parse_frame(frame(seg_duration=25))
    assert f.seg_duration == f.asked_seg_duration == 25.0


@pytest.mark.parametrize("task_id", ["\ud800", "a\udfffb", "\ud83d" * 3], ids=["high", "low-inside", "highs"])
def test_a_task_id_with_a_lone_surrogate_cannot_be_echoed(task_id: str) -> None:
    """JSON's \\u escapes can carry a lone surrogate, which no UTF-8 encoder takes (routing, logs and
    the answer would all fail): refused, its error frame with task_id null."""
    raw = frame(task_id=task_id, is_final=True)
    assert "\\ud8" in raw or "\\udf" in raw  # as it travels: ASCII, valid UTF-8
    e = bad(raw)
    assert e.task_id is None and "not valid Unicode" in str(e)
    assert json.loads(Result(e.task_id).to_json(error=("bad_request", str(e))))["task_id"] is None


def test_a_paired_surrogate_escape_is_a_character() -> None:
    assert parse_frame(frame(task_id="\ud83d\ude00 task")).task_id == "\U0001f600 task"


def test_a_bad_request_carries_the_frames_time_start_when_it_could_be_read() -> None:
    assert bad(frame(source="radio")).time_start == 1718000000.25
    assert bad(frame(task_id=None)).time_start == 1718000000.25  # read even without a task id
    assert bad(frame(source="radio", time_start="now")).time_start is None
    assert bad(frame(time_start=float("nan"))).time_start is None
    assert bad("not json").time_start is None


def test_task_id_of_256_characters_is_the_longest() -> None:
    assert parse_frame(frame(task_id="x" * 256)).task_id == "x" * 256
    e = bad(frame(task_id="x" * 4096, is_final=True))
    assert e.task_id is None and "4096 characters" in str(e) and len(str(e)) < 100


def test_client_strings_in_error_messages_are_clipped() -> None:
    e = bad(frame(source="r" * 10_000_000))
    assert len(str(e)) < 200 and "10000000 characters" in str(e)


@pytest.mark.parametrize(
    "raw",
    ["", "not json", "{", b"\xff\xfe{", "[1, 2]", '"a string"', "42", "null", "true"],
    ids=["empty", "text", "truncated", "not-utf8", "array", "string", "number", "null", "bool"],
)
def test_a_frame_that_is_not_a_json_object_is_refused_for_no_task(raw: str | bytes) -> None:
    e = bad(raw)
    assert e.task_id is None
    assert e.is_final is False


@pytest.mark.parametrize("raw", ["[" * 100_000, '{"task_id": "t", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"])
def test_json_nested_too_deep_is_refused_for_no_task(raw: str) -> None:
    e = bad(raw)
    assert e.task_id is None
    assert "JSON" in str(e)


@pytest.mark.parametrize("task_id", [None, 5, 1.5, True, ["a"], {"a": 1}, ""], ids=repr)
def test_a_frame_without_a_readable_task_id_is_refused_for_no_task(task_id: Any) -> None:
    e = bad(frame(task_id=task_id, is_final=True))  # None: no task_id at all
    assert e.task_id is None
    assert "task_id" in str(e)


BAD_FIELDS: list[tuple[str, dict[str, Any]]] = [
    ("source", {"source": None}),
    ("source", {"source": 1}),
    ("source", {"source": "microphone"}),
    ("source", {"source": ""}),
    ("is_final", {"is_final": None}),
    ("is_final", {"is_final": 1}),
    ("is_final", {"is_final": "true"}),
    ("time_start", {"time_start": None}),
    ("time_start", {"time_start": "1718000000"}),
    ("time_start", {"time_start": True}),
    ("time_start", {"time_start": float("nan")}),
    ("time_start", {"time_start": float("inf")}),
    ("time_start", {"time_start": float("-inf")}),
    ("time_start", {"time_start": 10**400}),  # an integer no float can hold
    ("time_frame", {"time_frame": "now"}),
    ("time_frame", {"time_frame": float("nan")}),
    ("data", {"data": None}),
    ("data", {"data": 5}),
    ("data", {"data": [0.0, 1.0]}),
    ("base64", {"data": "not base64!"}),
    ("base64", {"data": "AAA"}),
    ("base64", {"data": "ü"}),
    ("multiple of 4", {"data": base64.b64encode(b"\0" * 6).decode()}),
    ("multiple of 4", {"data": base64.b64encode(b"\0").decode()}),
    ("NaN", {"data": b64([0.0, float("nan")])}),
    ("NaN", {"data": b64([float("inf"), 0.0])}),
    ("NaN", {"data": b64([0.0, float("-inf")])}),
    ("seg_duration", {"seg_duration": 0}),
    ("seg_duration", {"seg_duration": -15}),
    ("seg_duration", {"seg_duration": "15"}),
    ("seg_duration", {"seg_duration": float("inf")}),
    ("seg_duration", {"seg_duration": float("nan")}),
    ("seg_duration", {"seg_duration": 10**400}),
    ("seg_overlap", {"seg_overlap": -1}),
    ("seg_overlap", {"seg_overlap": 15}),
    ("seg_overlap", {"seg_overlap": 20}),
    ("seg_overlap", {"seg_duration": 2, "seg_overlap": 2.5}),
    ("seg_overlap", {"seg_overlap": "2"}),
    ("seg_overlap", {"seg_overlap": float("nan")}),
    ("seg_overlap", {"seg_duration": 90, "seg_overlap": 60}),  # not below the 60 s served
    ("seg_overlap", {"seg_duration": 1000, "seg_overlap": 70}),
    ("source", {"source": "mic\ud800"}),
    ("context", {"context": 5}),
    ("context", {"context": ["hot", "words"]}),
    ("language", {"language": 1}),
    ("language", {"language": {"code": "zh"}}),
    ("context", {"context": "\udfff"}),
    ("language", {"language": "zh\ud83d"}),
]


@pytest.mark.parametrize(("names", "fields"), BAD_FIELDS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_FIELDS)])
@pytest.mark.parametrize("is_final", [False, True])
def test_a_malformed_field_is_refused_naming_it_for_its_task(
    names: str, fields: dict[str, Any], is_final: bool
) -> None:
    if "is_final" in fields:
        is_final = False  # the frame did not say is_final: true
    else:
        fields = {**fields, "is_final": is_final}
    e = bad(frame(**fields))
    assert e.task_id == "3f2a-task"
    assert e.is_final is is_final
    assert names.lower() in str(e).lower()


def test_nan_or_infinity_in_time_start_is_refused_for_its_task() -> None:
    # Python's json accepts these non-standard literals; they must not get through as numbers.
    for literal in ("NaN", "Infinity", "-Infinity"):
        raw = frame(time_start=0).replace('"time_start": 0', f'"time_start": {literal}')
        assert literal in raw
        assert bad(raw).task_id == "3f2a-task"


def test_bad_request_is_an_exception_with_defaults() -> None:
    e = BadRequest("x")
    assert (str(e), e.task_id, e.is_final) == ("x", None, False)


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("task_id", ["a", "task-1", "任务", "0123456789abcdef", "x" * 100])
def test_a_task_is_routed_by_the_crc32_of_its_id(task_id: str, count: int) -> None:
    assert route(task_id, count) == zlib.crc32(task_id.encode("utf-8")) % count
    assert 0 <= route(task_id, count) < count


# crc32 of these ids computed once; routing must never depend on the process or the run.
@pytest.mark.parametrize(
    ("task_id", "crc"),
    [("a", 3904355907), ("task-1", 3386884591), ("任务", 1592260957), ("0123456789abcdef", 1757737011)],
)
def test_routing_is_the_same_in_every_process_and_run(task_id: str, crc: int) -> None:
    for count in (1, 2, 3, 5, 8, 13):
        assert route(task_id, count) == crc % count


def test_routing_spreads_tasks_over_every_slot() -> None:
    slots = {route(f"task-{i}", 4) for i in range(100)}
    assert slots == {0, 1, 2, 3}


def test_result_has_every_client_key() -> None:
    r = Result(
        task_id="t",
        time_start=1.0,
        time_submit=2.0,
        time_complete=3.0,
        duration=4.56789,
        text="你好",
        text_accu="你好",
        tokens=("你", "好"),
        timestamps=(0.12345, 0.5),
        is_final=True,
    )
    obj = json.loads(r.to_json())
    assert set(CLIENT_KEYS) <= set(obj)
    assert "error" not in obj
    assert obj["task_id"] == "t" and obj["is_final"] is True
    assert (obj["time_start"], obj["time_submit"], obj["time_complete"]) == (1.0, 2.0, 3.0)
    assert obj["duration"] == 4.568
    assert obj["text"] == "你好" and obj["text_accu"] == "你好"
    assert obj["tokens"] == ["你", "好"]
    assert obj["timestamps"] == [0.123, 0.5]
    assert "你好" in r.to_json()  # not \u-escaped


def test_partial_result_is_not_final() -> None:
    obj = json.loads(Result(task_id="t", text="a", tokens=["a"], timestamps=[0.1]).to_json())
    assert obj["is_final"] is False
    assert set(CLIENT_KEYS) <= set(obj)


@pytest.mark.parametrize("task_id", ["t", None])
def test_error_result_is_a_complete_final_frame(task_id: str | None) -> None:
    r = Result(task_id=task_id, time_start=5.0, text="half", text_accu="half", tokens=["h"], timestamps=[0.1])
    obj = json.loads(r.to_json(error=("worker_crashed", "slot 0 died")))
    assert set(CLIENT_KEYS) <= set(obj)
    assert obj["task_id"] == task_id
    assert obj["is_final"] is True
    assert obj["text"] == ""
    assert isinstance(obj["tokens"], list) and isinstance(obj["timestamps"], list)
    assert isinstance(obj["duration"], (int, float))
    assert obj["time_start"] == 5.0
    assert obj["error"] == {"code": "worker_crashed", "message": "slot 0 died"}


def test_a_bad_request_gets_a_final_error_frame_saying_why() -> None:
    e = bad(frame(task_id="t1", is_final=True, data="%%%"))
    obj = json.loads(Result(task_id=e.task_id).to_json(error=("bad_request", str(e))))
    assert obj["task_id"] == "t1" and obj["is_final"] is True
    assert obj["error"]["code"] == "bad_request"
    assert "base64" in obj["error"]["message"]
