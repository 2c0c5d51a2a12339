"""The API's pure parts: fields checked, answers shaped (json, text, srt, vtt, verbose_json),
granularity rules, stream deltas, error bodies, key files (docs/design.md#the-openai-compatible-api)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capsd.api.keys import bearer, check_keys, loopback_only, parse_keys, read_keys
from capsd.api.responses import ApiError, Deltas, Params, Transcript, error_body, parse_params, render, verbose
from capsd.config import ApiConfig, ConfigError
from capsd.merge import realign
from capsd.textformat import format_final

pytestmark = pytest.mark.unit

TEXT = Transcript("12345", list("12345"), [0.2, 0.7, 1.2, 2.7, 3.2], 3.7)  # a pause between 3 and 4


def fields(**values: str | list[str]) -> dict[str, list[str]]:
    return {k.replace("_gr", "_granularities[]"): v if isinstance(v, list) else [v] for k, v in values.items()}


def test_json_is_exactly_the_text_and_text_is_raw() -> None:
    assert render(TEXT, Params("m")) == ('{"text": "12345"}', "application/json")
    assert json.loads(render(TEXT, Params("m"))[0]) == {"text": "12345"}
    assert render(TEXT, Params("m", "text"))[0] == "12345\n"


def test_srt_and_vtt_split_at_a_pause_with_times_from_the_tokens() -> None:
    srt = render(TEXT, Params("m", "srt"))[0]
    assert srt == "1\n00:00:00,200 --> 00:00:02,200\n123\n\n2\n00:00:02,700 --> 00:00:03,700\n45\n\n"
    vtt = render(TEXT, Params("m", "vtt"))[0]
    assert vtt == "WEBVTT\n\n00:00:00.200 --> 00:00:02.200\n123\n\n00:00:02.700 --> 00:00:03.700\n45\n\n"
    assert render(Transcript("", [], [], 0.0), Params("m", "srt"))[0] == ""


def test_srt_clock_reaches_hours() -> None:
    t = Transcript("1", ["1"], [3723.0405], 3724.0)
    assert "01:02:03,041 --> 01:02:04,000" in render(t, Params("m", "srt"))[0]


def test_segments_end_at_a_sentence_and_keep_the_texts_spaces() -> None:
    text = "hello world。再见"
    tokens, times = realign(["hello", "world", "。", "再", "见"], [0.0, 0.4, 0.8, 0.9, 1.1], text)
    body = verbose(Transcript(text, tokens, times, 1.5), Params("m", "verbose_json"))
    assert [s["text"] for s in body["segments"]] == ["hello world。", "再见"]


@pytest.mark.parametrize(
    ("asked", "segments", "words"),
    [([], True, False), (["segment"], True, False), (["word"], False, True), (["word", "segment"], True, True)],
)
def test_granularities_follow_openais_rules(asked: list[str], segments: bool, words: bool) -> None:
    params = parse_params(fields(model="m", response_format="verbose_json", **({"timestamp_gr": asked} if asked else {})))
    body = verbose(TEXT, params)
    assert ("segments" in body) == segments and ("words" in body) == words
    assert {"task", "language", "duration", "text"} <= body.keys()
    if words:
        assert body["words"][0] == {"word": "1", "start": 0.2, "end": 0.7}
        assert body["words"][2] == {"word": "3", "start": 1.2, "end": 2.2}  # at most 1 s long
        assert body["words"][-1]["end"] == 3.7  # the last: to the audio's end


@pytest.mark.parametrize(
    ("given", "param"),
    [
        ({}, "model"),
        ({"model": "m", "response_format": "diarized_json"}, "response_format"),
        ({"model": "m", "timestamp_gr": ["word"]}, "timestamp_granularities[]"),
        ({"model": "m", "response_format": "verbose_json", "timestamp_gr": ["char"]}, "timestamp_granularities[]"),
        ({"model": "m", "stream": "yes"}, "stream"),
        ({"model": "m", "stream": "true", "response_format": "srt"}, "stream"),
        ({"model": "m", "temperature": "hot"}, "temperature"),
        ({"model": "m", "temperature": "1.5"}, "temperature"),
        ({"model": "m", "temperature": "nan"}, "temperature"),
        ({"model": "m", "language": "x" * 65}, "language"),
    ],
)
def test_a_bad_field_is_a_400_naming_it(given: dict[str, str | list[str]], param: str) -> None:
    with pytest.raises(ApiError) as refused:
        parse_params(fields(**given))
    assert refused.value.status == 400 and refused.value.param == param
    assert refused.value.body()["error"]["type"] == "invalid_request_error"


def test_hints_are_accepted_and_unknown_fields_ignored() -> None:
    params = parse_params(fields(model="whisper-1", language="zh", prompt="p", temperature="0.2", stream="TRUE",
                                 chunking_strategy="auto"))  # fmt: skip
    assert params == Params("whisper-1", "json", frozenset(), "zh", "p", 0.2, True)


def test_error_bodies_have_every_key_and_the_headers_say_when_not_to_retry() -> None:
    assert error_body(429, "busy", "overloaded") == {
        "error": {"message": "busy", "type": "rate_limit_error", "param": None, "code": "overloaded"}
    }
    assert error_body(500, "x", "worker_crashed")["error"]["type"] == "server_error"
    assert ApiError(429, "busy", retry_after=2).headers() == {"Retry-After": "2"}
    assert ApiError(413, "big", final=True).headers() == {"x-should-retry": "false"}


def feed_partials(deltas: Deltas, tokens: list[str], times: list[float], ends: list[float]) -> list[str]:
    out = []
    for end in ends:
        kept = [i for i, t in enumerate(times) if t < end]
        out.append(deltas.partial([tokens[i] for i in kept], [times[i] for i in kept], end))
    return out


def test_deltas_stream_settled_text_and_add_up_to_the_final_text() -> None:
    tokens, times = list("你好世界再见朋友"), [0.5, 1.0, 1.5, 2.0, 27.0, 27.5, 30.0, 30.5]
    deltas = Deltas(num=True, spell=True, punctuate=False, settled_s=1.0)
    got = feed_partials(deltas, tokens, times, [27.0, 29.0, 31.0])
    assert got == ["你好世界", "再见", ""]  # 朋友 lies within the last second: it may still change
    assert deltas.final("你好世界再见朋友") == "朋友"
    assert "".join(deltas.pieces) == "你好世界再见朋友"


@pytest.mark.parametrize("raw", ["三十而立", "二十年", "第一二", "百分之五十", "乱七八糟", "三点一四"])
def test_deltas_never_send_what_a_later_character_reformats(raw: str) -> None:
    deltas = Deltas(num=True, spell=True, punctuate=False, settled_s=0.0)
    times = [float(i) for i in range(len(raw))]
    for n in range(1, len(raw) + 1):
        deltas.partial(list(raw[:n]), times[:n], n + 0.5)
    final = format_final(raw, num=True, spell=True, punctuator=None)
    deltas.final(final)
    assert "".join(deltas.pieces) == final


def test_deltas_wait_for_the_end_when_the_text_is_punctuated() -> None:
    deltas = Deltas(num=True, spell=True, punctuate=True, settled_s=1.0)
    assert deltas.partial(list("你好"), [0.0, 0.5], 10.0) == ""
    assert deltas.final("你好。") == "你好。"


def test_key_files_skip_blanks_and_comments_and_bearer_reads_the_header() -> None:
    assert parse_keys("# keys\n\n  sk-one  \nsk-two\n   # indented comment\n") == {"sk-one", "sk-two"}
    assert bearer("Bearer sk-one") == "sk-one" and bearer("bearer  sk-one ") == "sk-one"
    assert bearer("Basic abc") is None and bearer(None) is None and bearer("Bearer a b") is None


def test_an_unreadable_keys_file_is_refused_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[api\] keys_file"):
        read_keys(ApiConfig(keys_file=str(tmp_path / "missing")))
    (tmp_path / "keys").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"\[api\] keys_file"):
        read_keys(ApiConfig(keys_file=str(tmp_path / "keys")))


def test_only_loopback_may_listen_without_keys_unless_anonymous_is_allowed() -> None:
    assert loopback_only("127.0.0.1") and loopback_only("::1") and not loopback_only("0.0.0.0")
    check_keys(ApiConfig(), "127.0.0.1", frozenset())
    check_keys(ApiConfig(), "0.0.0.0", frozenset({"k"}))
    check_keys(ApiConfig(allow_anonymous=True), "0.0.0.0", frozenset())
    check_keys(ApiConfig(port=0), "0.0.0.0", frozenset())  # off: nothing listens
    with pytest.raises(ConfigError, match=r"\[api\] keys_file = '' is refused.*allow_anonymous"):
        check_keys(ApiConfig(), "0.0.0.0", frozenset())
