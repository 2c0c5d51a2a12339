"""The OpenAI-compatible API through the official `openai` SDK, against a real capsd with real
workers and the tone-coded model: every format and granularity exact, media decoded exactly,
streaming, keys, bounds and failures (docs/design.md#the-openai-compatible-api)."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from capsd.memory import API_MAX_REQUESTS
from capsd.selftest.tones import synth, token_digits
from tests.support.checks import dictate, scrape, wait_for
from tests.support.daemon import CAPSD, Capsd, free_port, write_config
from tests.support.media import FORMATS, encode

pytestmark = pytest.mark.integration

KEY = "sk-capsd-test-key"
TOLERANCE_S = 0.1  # as the CapsWriter tests' (tests.support.checks.assert_exact)


@pytest.fixture(scope="module")
def capsd(tmp_path_factory: pytest.TempPathFactory, heavy_model: Path) -> Iterator[Capsd]:
    """2 workers of the heavy model, a key, uploads of at most 1 MiB: shared by this module's tests."""
    tmp = tmp_path_factory.mktemp("api")
    (tmp / "keys").write_text(f"# the test's key\n{KEY}\n")
    daemon = Capsd(tmp, {"workers": {"count": 2}, "model": {"dir": str(heavy_model)},
                         "api": {"keys_file": str(tmp / "keys"), "max_upload_mb": 1}})  # fmt: skip
    yield daemon
    assert daemon.stop() == 0


def client(daemon: Capsd, key: str = KEY, **options: Any) -> openai.OpenAI:
    """The SDK as a script would use it; no retries, so that each answer is the first one, and no
    client timeout that could fire before capsd has acted."""
    return openai.OpenAI(base_url=daemon.api_url, api_key=key, max_retries=0, timeout=300, **options)


def sequence(n: int, kind: str) -> str:
    """About 20 s of digits for request n. MP3, a lossy codec, smears a tone 7 into the 8 after it
    (the tone-coded model then hears 768 in 78: the codec's doing, the same without capsd): its
    files avoid that pair."""
    body = "3141592653" * 4 if kind.startswith("mp3") else "0123456789" * 4
    return str(n) * 2 + body


def upload(digits: str, kind: str = "wav") -> tuple[tuple[str, bytes], list[float]]:
    samples, starts = synth(digits)
    fmt = FORMATS[kind]
    return (f"tones.{fmt[0]}", encode(samples, *fmt)), starts


def near(times: list[float], starts: list[float]) -> bool:
    return len(times) == len(starts) and max(abs(a - b) for a, b in zip(times, starts)) < TOLERANCE_S


@pytest.mark.parametrize("kind", list(FORMATS))
def test_json_is_exactly_the_text_for_every_media_kind(capsd: Capsd, kind: str) -> None:
    file, _ = upload("3141592653", kind)
    raw = client(capsd).audio.transcriptions.with_raw_response.create(file=file, model="whisper-1")
    assert raw.http_response.json() == {"text": "3141592653"}
    assert raw.headers["content-type"].startswith("application/json")


def test_text_srt_and_vtt_are_raw_text_bodies(capsd: Capsd) -> None:
    file, starts = upload("12  345")  # a pause of 1.5 s between 2 and 3: two subtitles
    api = client(capsd).audio.transcriptions
    assert api.create(file=file, model="whisper-1", response_format="text") == "12345\n"
    srt = api.create(file=file, model="whisper-1", response_format="srt")
    vtt = api.create(file=file, model="whisper-1", response_format="vtt")
    clock = r"(\d\d):(\d\d):(\d\d)[,.](\d\d\d)"
    cue = re.compile(rf"{clock} --> {clock}\n(.*)\n")
    for body, head, numbered in ((srt, "", True), (vtt, "WEBVTT\n\n", False)):
        assert body.startswith(head) and not body.startswith('"')
        cues = [(int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3]) + int(m[4]) / 1000,
                 int(m[5]) * 3600 + int(m[6]) * 60 + int(m[7]) + int(m[8]) / 1000, m[9]) for m in cue.finditer(body)]  # fmt: skip
        assert [text for _, _, text in cues] == ["12", "345"]
        assert near([start for start, _, _ in cues], [starts[0], starts[2]])
        assert starts[1] < cues[0][1] <= starts[2] and cues[1][1] > starts[4]
        assert body.count("\n\n") == (2 if numbered else 3)
        if numbered:
            assert body.startswith("1\n") and "\n\n2\n" in body


@pytest.mark.parametrize("granularities", [None, ["segment"], ["word"], ["word", "segment"]])
def test_verbose_json_follows_openais_granularity_rules(capsd: Capsd, granularities: list[str] | None) -> None:
    file, starts = upload("2718281828")
    extra = {"timestamp_granularities": granularities} if granularities else {}
    raw = client(capsd).audio.transcriptions.with_raw_response.create(
        file=file, model="whisper-1", response_format="verbose_json", language="zh", **extra
    )
    body = raw.http_response.json()
    result = raw.parse()
    assert body["task"] == "transcribe" and body["language"] == "zh" and result.text == "2718281828"
    assert abs(body["duration"] - (starts[-1] + 0.5)) < 0.01
    wants_words = granularities is not None and "word" in granularities
    wants_segments = granularities is None or "segment" in granularities
    assert ("words" in body) == wants_words and ("segments" in body) == wants_segments
    if wants_words:
        assert [w.word for w in result.words] == list("2718281828")
        assert near([w.start for w in result.words], starts)
        assert all(w.start < w.end <= w.start + 1.0 for w in result.words)
    if wants_segments:
        [segment] = result.segments
        assert segment.text == "2718281828" and segment.id == 0
        assert abs(segment.start - starts[0]) < TOLERANCE_S and segment.end > starts[-1]


def test_timestamp_granularities_without_verbose_json_is_a_bad_request(capsd: Capsd) -> None:
    file, _ = upload("12")
    with pytest.raises(openai.BadRequestError) as refused:
        client(capsd).audio.transcriptions.create(file=file, model="whisper-1", timestamp_granularities=["word"])
    assert refused.value.body["param"] == "timestamp_granularities[]"


def test_models_lists_the_model_served(capsd: Capsd, heavy_model: Path) -> None:
    [model] = client(capsd).models.list().data
    assert model.object == "model" and model.id == heavy_model.name and model.owned_by == "capsd"


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
def test_translations_are_refused_in_openais_shape(capsd: Capsd) -> None:
    file, _ = upload("12")
    with pytest.raises(openai.BadRequestError) as refused:
        client(capsd).audio.translations.create(file=file, model="whisper-1")
    assert set(refused.value.body) == {"message", "type", "param", "code"}
    assert refused.value.body["code"] == "unsupported_endpoint"


def test_a_wrong_or_missing_key_is_an_authentication_error(capsd: Capsd) -> None:
    file, _ = upload("12")
    with pytest.raises(openai.AuthenticationError) as refused:
        client(capsd, key="sk-wrong").audio.transcriptions.create(file=file, model="whisper-1")
    assert refused.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError) as missing:  # the SDK always sends a key: a header without one
        client(capsd, default_headers={"Authorization": ""}).models.list()
    assert missing.value.body["code"] == "invalid_api_key" and "Bearer" in missing.value.body["message"]
    assert KEY not in capsd.logs() and "sk-wrong" not in capsd.logs()


def test_junk_bytes_are_a_bad_request_and_capsd_keeps_serving(capsd: Capsd) -> None:
    api = client(capsd).audio.transcriptions
    with pytest.raises(openai.BadRequestError) as refused:
        api.create(file=("junk.mp3", os.urandom(50_000)), model="whisper-1")
    assert set(refused.value.body) == {"message", "type", "param", "code"}
    assert refused.value.body["code"] == "undecodable_file" and refused.value.body["type"] == "invalid_request_error"
    assert refused.value.response.headers["x-should-retry"] == "false"
    file, _ = upload("4711")
    assert api.create(file=file, model="whisper-1").text == "4711"


def test_an_upload_over_max_upload_mb_is_refused_with_413(capsd: Capsd) -> None:
    with pytest.raises(openai.APIStatusError) as refused:
        client(capsd).audio.transcriptions.create(file=("big.wav", os.urandom(3 * 2**20)), model="whisper-1")
    assert refused.value.status_code == 413 and refused.value.body["code"] == "upload_too_large"
    assert refused.value.response.headers["x-should-retry"] == "false"


def raw_request(port: int, head: str, body: bytes) -> bytes:
    """Send a head and part of a body, then read the answer without sending the rest."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head.encode() + body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        return answer


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_an_upload_over_the_limit_gets_413_before_it_is_all_read(capsd: Capsd, framing: str) -> None:
    boundary = "xyz"
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n").encode()  # fmt: skip
    head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n")  # fmt: skip
    if framing == "content-length":  # 100 MB announced, 64 KiB sent
        answer = raw_request(capsd.api_port, head + "Content-Length: 100000000\r\n\r\n", part + b"\0" * 65536)
    else:  # 1.5 MiB sent of a body that never ends
        data = part + b"\0" * (3 * 2**19)
        answer = raw_request(capsd.api_port, head + "Transfer-Encoding: chunked\r\n\r\n",
                             f"{len(data):x}\r\n".encode() + data + b"\r\n")  # fmt: skip
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]


def test_streaming_deltas_add_up_to_the_final_text(capsd: Capsd) -> None:
    file, _ = upload("1414213562")
    api = client(capsd).audio.transcriptions
    events = list(api.create(file=file, model="whisper-1", stream=True))
    assert [e.type for e in events][-1] == "transcript.text.done"
    assert all(e.type == "transcript.text.delta" for e in events[:-1]) and len(events) >= 2
    assert "".join(e.delta for e in events[:-1]) == events[-1].text == "1414213562"


def test_eight_requests_at_once_are_exact_while_a_dictation_is_answered_promptly(capsd: Capsd) -> None:
    files = [(sequence(n, kind), upload(sequence(n, kind), kind)) for n, kind in zip(range(8), list(FORMATS) * 3)]
    api = openai.AsyncOpenAI(base_url=capsd.api_url, api_key=KEY, max_retries=0, timeout=300)

    async def one(digits: str, file: tuple[str, bytes], starts: list[float]) -> None:
        result = await api.audio.transcriptions.create(file=file, model="whisper-1", response_format="verbose_json",
                                                       timestamp_granularities=["word"])  # fmt: skip
        assert result.text == digits and near([w.start for w in result.words], starts)

    async def scenario() -> None:
        requests = [asyncio.ensure_future(one(digits, *f)) for digits, f in files]
        await asyncio.to_thread(wait_for, lambda: capsd.status()["api"]["requests_in_progress"] >= 4, 60, "busy")
        await dictate(capsd.url, "dictation-beside-api")
        await asyncio.gather(*requests)

    asyncio.run(scenario())
    metrics = scrape(capsd)
    assert metrics[("capsd_tasks_total", (("outcome", "done"), ("source", "api")))] >= 8
    assert capsd.status()["api"]["requests_in_progress"] == 0


@pytest.fixture(scope="module")
def raw_digits(tmp_path_factory: pytest.TempPathFactory, heavy_model: Path) -> Iterator[Capsd]:
    """1 worker of the heavy model, numerals not formatted ([format] num = false): deltas stream."""
    daemon = Capsd(tmp_path_factory.mktemp("api-raw"), {"model": {"dir": str(heavy_model)}, "format": {"num": False}})
    yield daemon
    assert daemon.stop() == 0


def test_streaming_deltas_come_segment_by_segment(raw_digits: Capsd) -> None:
    digits = "1234567890" * 16  # 80 s: 4 segments of 25 + 2 s
    samples, _ = synth(digits)
    api = client(raw_digits).audio.transcriptions
    events = list(api.create(file=("long.flac", encode(samples, *FORMATS["flac-44k-stereo"])), model="x", stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert len(deltas) >= 2 and events[-1].type == "transcript.text.done"
    assert "".join(deltas) == events[-1].text and token_digits(events[-1].text) == digits


def test_a_worker_killed_during_a_request_fails_only_that_request(raw_digits: Capsd) -> None:
    long, _ = synth("1234567890" * 12)  # 60 s: a few seconds of decoding
    short, _ = synth("4242")
    api = openai.AsyncOpenAI(base_url=raw_digits.api_url, api_key="x", max_retries=0, timeout=300)

    async def scenario() -> tuple[BaseException | None, str]:
        doomed = asyncio.ensure_future(api.audio.transcriptions.create(file=("long.wav", encode(long)), model="x"))
        await asyncio.to_thread(wait_for, lambda: raw_digits.status()["slots"][0]["state"] == "busy", 60, "busy")
        waiting = asyncio.ensure_future(api.audio.transcriptions.create(file=("short.wav", encode(short)), model="x"))
        await asyncio.to_thread(wait_for, lambda: raw_digits.status()["api"]["requests_in_progress"] == 2, 60, "2")
        os.kill(raw_digits.worker_pid(0), signal.SIGKILL)
        failed = (await asyncio.gather(doomed, return_exceptions=True))[0]
        return failed if isinstance(failed, BaseException) else None, (await waiting).text

    failed, text = asyncio.run(scenario())
    assert isinstance(failed, openai.InternalServerError), failed
    assert failed.status_code == 500 and failed.body["code"] == "worker_crashed" and "slot 0" in failed.body["message"]
    assert token_digits(text) == "4242"
    wait_for(lambda: raw_digits.status()["slots"][0]["state"] == "ready", 60, "replaced")
    assert token_digits(client(raw_digits).audio.transcriptions.create(file=("s.wav", encode(short)), model="x").text) == "4242"


def test_with_retry_a_worker_killed_during_a_request_leaves_the_answer_exact(start_capsd: Any, heavy_model: Path) -> None:
    """`[workers] retry_lost_jobs = 1`: the job lost with the worker runs again on its replacement."""
    daemon = start_capsd({"model": {"dir": str(heavy_model)}, "workers": {"retry_lost_jobs": 1}})
    digits = "1234567890" * 12  # 60 s: 3 segments
    samples, starts = synth(digits)

    async def scenario() -> Any:
        api = openai.AsyncOpenAI(base_url=daemon.api_url, api_key="x", max_retries=0, timeout=300)
        request = asyncio.ensure_future(api.audio.transcriptions.create(
            file=("l.wav", encode(samples)), model="x", response_format="verbose_json", timestamp_granularities=["word"]))  # fmt: skip

        def decoding() -> int | None:  # stopped while busy: its job cannot finish before the kill
            slot = daemon.status()["slots"][0]
            if slot["state"] != "busy":
                return None
            os.kill(slot["pid"], signal.SIGSTOP)
            if daemon.status()["slots"][0]["state"] == "busy":
                return slot["pid"]
            os.kill(slot["pid"], signal.SIGCONT)
            return None

        os.kill(await asyncio.to_thread(wait_for, decoding, 60, "a job of the request in the worker"), signal.SIGKILL)
        return await request

    result = asyncio.run(scenario())
    assert result.text == digits and near([w.start for w in result.words], starts)
    slot = daemon.status()["slots"][0]
    assert slot["restarts"] == 1 and slot["tasks_failed"] == 0 and slot["tasks_done"] == 1
    assert "job retried" in daemon.logs()


def test_a_request_still_uploading_when_the_stop_times_out_gets_503_and_capsd_exits_0(start_capsd: Any) -> None:
    daemon = start_capsd({"server": {"stop_timeout_s": 1}})
    upload = http.client.HTTPConnection("127.0.0.1", daemon.api_port, timeout=120)  # capsd answers after ~1 s
    upload.putrequest("POST", "/v1/audio/transcriptions")
    upload.putheader("Content-Type", "multipart/form-data; boundary=b")
    upload.putheader("Content-Length", "100000")
    upload.endheaders(b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
                      b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n' + bytes(1000))  # fmt: skip
    wait_for(lambda: daemon.status()["api"]["requests_in_progress"] == 1, 30, "the upload in progress")
    daemon.proc.send_signal(signal.SIGTERM)
    response = upload.getresponse()  # the rest of the body is never sent
    error = json.loads(response.read())["error"]
    assert response.status == 503 and set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "shutting_down" and error["message"] == "capsd is stopping"
    assert daemon.proc.wait(60) == 0
    assert "status=503" in daemon.logs()


def test_a_client_that_disconnects_cancels_its_task_at_once(raw_digits: Capsd) -> None:
    long, _ = synth("1234567890" * 24)  # 120 s: 5 segments, most still waiting when the client goes
    before = raw_digits.status()["slots"][0]["segments_decoded"]

    async def scenario() -> None:
        api = openai.AsyncOpenAI(base_url=raw_digits.api_url, api_key="x", max_retries=0, timeout=300)
        request = asyncio.ensure_future(api.audio.transcriptions.create(file=("l.wav", encode(long)), model="x"))
        await asyncio.to_thread(wait_for, lambda: raw_digits.status()["slots"][0]["state"] == "busy", 60, "busy")
        request.cancel()  # the connection is closed
        await asyncio.gather(request, return_exceptions=True)

    asyncio.run(scenario())
    wait_for(lambda: raw_digits.status()["slots"][0]["tasks_in_progress"] == 0, 30, "the task cancelled")
    assert raw_digits.status()["slots"][0]["queue_depth"] == 0
    wait_for(lambda: "status=499" in raw_digits.logs(), 10, "the request's log line")
    assert raw_digits.status()["slots"][0]["segments_decoded"] - before < 5


def test_keys_are_reloaded_on_sighup(start_capsd: Any, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("old-key\n")
    daemon = start_capsd({"api": {"keys_file": str(keys)}})
    file, _ = upload("12")
    assert client(daemon, "old-key").audio.transcriptions.create(file=file, model="m").text == "12"
    keys.write_text("new-key\n")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "api keys reloaded" in daemon.logs(), 30, "the reload")
    with pytest.raises(openai.AuthenticationError):
        client(daemon, "old-key").audio.transcriptions.create(file=file, model="m")
    assert client(daemon, "new-key").audio.transcriptions.create(file=file, model="m").text == "12"
    assert "new-key" not in daemon.logs() and "old-key" not in daemon.logs()


def test_requests_beyond_the_bound_get_429_with_retry_after_and_a_dictation_is_served(start_capsd: Any) -> None:
    daemon = start_capsd()
    head = ("POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            "Content-Length: 100000\r\n\r\n--b\r\n")  # fmt: skip
    stalled = []
    for _ in range(API_MAX_REQUESTS):  # uploads that stop sending: each holds a request in progress
        sock = socket.create_connection(("127.0.0.1", daemon.api_port), timeout=60)
        sock.sendall(head.encode())
        stalled.append(sock)
    try:
        wait_for(lambda: daemon.status()["api"]["requests_in_progress"] == API_MAX_REQUESTS, 30, "all held")
        file, _ = upload("12")
        with pytest.raises(openai.RateLimitError) as refused:
            client(daemon).audio.transcriptions.create(file=file, model="m")
        assert refused.value.response.headers["retry-after"] == "2"
        asyncio.run(dictate(daemon.url, "dictation-beside-full-api"))
    finally:
        for sock in stalled:
            sock.close()
    wait_for(lambda: daemon.status()["api"]["requests_in_progress"] == 0, 30, "released")
    assert client(daemon).audio.transcriptions.create(file=file, model="m").text == "12"


def test_a_stop_lets_a_request_in_progress_finish_and_refuses_new_ones(start_capsd: Any, heavy_model: Path) -> None:
    daemon = start_capsd({"model": {"dir": str(heavy_model)}})
    long, _ = synth("1234567890" * 8)  # 40 s

    async def scenario() -> tuple[str, BaseException | None]:
        api = openai.AsyncOpenAI(base_url=daemon.api_url, api_key="x", max_retries=0, timeout=300)
        request = asyncio.ensure_future(api.audio.transcriptions.create(file=("l.wav", encode(long)), model="x"))
        await asyncio.to_thread(wait_for, lambda: daemon.status()["slots"][0]["state"] == "busy", 60, "busy")
        daemon.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(wait_for, lambda: "stopping" in daemon.logs(), 30, "stopping")
        late = None
        try:
            await api.audio.transcriptions.create(file=("s.wav", encode(synth("12")[0])), model="x")
        except openai.APIStatusError as e:
            late = e
        return (await request).text, late

    text, late = asyncio.run(scenario())
    assert text == "1234567890" * 8
    assert isinstance(late, openai.APIStatusError) and late.status_code == 503
    assert late.body["code"] == "shutting_down"
    assert daemon.proc.wait(30) == 0


def test_off_loopback_without_keys_is_refused_at_start_naming_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", {"server": {"port": free_port()}, "control": {"socket": str(tmp_path / "s")},
                                                "api": {"addr": "0.0.0.0", "port": free_port()}})  # fmt: skip
    done = subprocess.run([*CAPSD, "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 78 and "[api] keys_file" in done.stderr and "allow_anonymous" in done.stderr


def test_fields_over_their_bounds_are_bad_requests_while_a_good_request_is_served(capsd: Capsd) -> None:
    """A field of more than 64 KiB, more than 64 fields: 400, and a good request alongside exact."""
    api = client(capsd).audio.transcriptions
    file, _ = upload("2718")

    async def scenario() -> tuple[str, list[BaseException]]:
        good = asyncio.to_thread(lambda: api.create(file=file, model="whisper-1").text)
        too_long = asyncio.to_thread(api.create, file=file, model="whisper-1", prompt="x" * (64 * 2**10 + 1))
        too_many = asyncio.to_thread(api.create, file=file, model="whisper-1",
                                     extra_body={f"field{i}": "x" for i in range(70)})  # fmt: skip
        text, *refused = await asyncio.gather(good, too_long, too_many, return_exceptions=True)
        return text, refused  # type: ignore[return-value]

    text, refused = asyncio.run(scenario())
    assert text == "2718"
    for error, words in zip(refused, ("longer than 65536 bytes", "more than 64 fields")):
        assert isinstance(error, openai.BadRequestError) and words in error.body["message"], error


def test_an_upload_that_stalls_gets_400_after_30_s_while_a_good_request_is_served(capsd: Capsd) -> None:
    boundary = "stall"
    head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 100000\r\n\r\n")  # fmt: skip
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'.encode()
    with socket.create_connection(("127.0.0.1", capsd.api_port), timeout=120) as sock:
        sock.sendall(head.encode() + part + b"\0" * 1000)  # then nothing
        file, _ = upload("1618")
        assert client(capsd).audio.transcriptions.create(file=file, model="whisper-1").text == "1618"
        answer = b""
        while b"\r\n\r\n" not in answer and (data := sock.recv(65536)):
            answer += data
    assert answer.startswith(b"HTTP/1.1 400 ") and b"upload_timeout" in answer, answer[:300]


def test_decoded_audio_longer_than_the_bound_is_refused_by_the_decode_process(tmp_path: Path) -> None:
    """The bound (4 h) as the decode process applies it, given 1 s: exit 1, saying why."""
    file, _ = upload("31415")  # ~2.5 s
    (tmp_path / "in.wav").write_bytes(file[1])
    done = subprocess.run([*CAPSD[:1], "-m", "capsd.api.decode", str(tmp_path / "in.wav"), str(tmp_path / "out"),
                           "1", str(os.getpid())], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1 and "longer than" in done.stderr, done.stderr
