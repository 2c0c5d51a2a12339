"""The API under malformed multipart, wrong field types, truncated and hostile media: every
request answered (OpenAI's error shape, or a transcription), the supervisor alive, and no
descriptor, temporary file or memory left behind (a real capsd, real workers)."""

from __future__ import annotations

import http.client
import json
import os
import random
from collections.abc import Iterator

import psutil
import pytest

from capsd.selftest.tones import synth
from tests.support.daemon import Capsd
from tests.support.media import FORMATS, encode

pytestmark = pytest.mark.integration

BOUNDARY = "fuzzb"


@pytest.fixture(scope="module")
def capsd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Capsd]:
    """Its uploads under a TMPDIR of its own: other capsd on the machine make their directories in /tmp."""
    tmp = tmp_path_factory.mktemp("api-fuzz")
    (tmp / "tmpdir").mkdir()
    daemon = Capsd(tmp, {"api": {"max_upload_mb": 1}}, env={**os.environ, "TMPDIR": str(tmp / "tmpdir")})
    yield daemon
    assert daemon.stop() == 0


def part(name: str, value: bytes, filename: str | None = None, headers: str = "") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n{headers}\r\n".encode() + value + b"\r\n"


def body(*parts: bytes, end: bool = True) -> bytes:
    return b"".join(parts) + (f"--{BOUNDARY}--\r\n".encode() if end else b"")


def post(port: int, data: bytes, content_type: str = f"multipart/form-data; boundary={BOUNDARY}") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/audio/transcriptions", body=data, headers={"Content-Type": content_type})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def cases(rng: random.Random) -> list[tuple[str, bytes, str]]:
    samples, _ = synth("31415")
    wav = encode(samples)
    flac = encode(samples, *FORMATS["flac-44k-stereo"])
    mp3 = encode(samples, *FORMATS["mp3-48k"])
    model = part("model", b"whisper-1")
    multipart = f"multipart/form-data; boundary={BOUNDARY}"

    def flipped(data: bytes, n: int) -> bytes:
        out = bytearray(data)
        for _ in range(n):
            out[rng.randrange(44, len(out))] = rng.randrange(256)  # past a WAV header: the decoder sees it
        return bytes(out)

    media = [
        wav[:30], wav[:1000], flac[:200], flac[: len(flac) // 2], mp3[:300], mp3[: len(mp3) // 3],
        flipped(wav, 50), flipped(flac, 50), flipped(mp3, 50), os.urandom(2000), b"", b"RIFF" + os.urandom(100),
        b"fLaC" + b"\xff" * 500, b"ID3" + b"\x00" * 7 + os.urandom(900), b"OggS" + os.urandom(500),
        b"\x00\x00\x00\x20ftypisom" + os.urandom(500), b"\x1a\x45\xdf\xa3" + os.urandom(500),
        wav[:44] + b"\x7f" * 200_000,  # a WAV header claiming more than there is
    ]  # fmt: skip
    out = [(f"media {n}", body(model, part("file", m, "a.bin")), multipart) for n, m in enumerate(media)]
    out += [
        ("no file", body(model), multipart),
        ("no model", body(part("file", wav, "a.wav")), multipart),
        ("two files", body(model, part("file", wav, "a.wav"), part("file", wav, "b.wav")), multipart),
        ("file as a field", body(model, part("file", b"text")), multipart),
        ("format a number", body(model, part("response_format", b"7"), part("file", wav, "a.wav")), multipart),
        ("stream yes", body(model, part("stream", b"yes"), part("file", wav, "a.wav")), multipart),
        ("temperature text", body(model, part("temperature", b"hot"), part("file", wav, "a.wav")), multipart),
        ("granularity junk", body(model, part("timestamp_granularities[]", b"\x00"), part("file", wav, "a.wav")), multipart),
        ("field not utf-8", body(part("model", b"\xff\xfe"), part("file", wav, "a.wav")), multipart),
        ("field too long", body(part("prompt", b"p" * 70_000), model, part("file", wav, "a.wav")), multipart),
        ("many fields", body(*[part(f"f{i}", b"x") for i in range(80)], model, part("file", wav, "a.wav")), multipart),
        ("no end", body(model, part("file", wav, "a.wav"), end=False), multipart),
        ("truncated", body(model, part("file", wav, "a.wav"))[:500], multipart),
        ("wrong boundary", body(model, part("file", wav, "a.wav")), "multipart/form-data; boundary=other"),
        ("no boundary", body(model, part("file", wav, "a.wav")), "multipart/form-data"),
        ("json body", json.dumps({"model": "m", "file": "x"}).encode(), "application/json"),
        ("garbage", os.urandom(5000), multipart),
        ("nested", body(model, part("file", body(model), "a", f"Content-Type: multipart/mixed; boundary={BOUNDARY}\r\n")), multipart),
        ("good", body(model, part("file", wav, "a.wav")), multipart),
    ]  # fmt: skip
    return out


def process_state(pid: int) -> tuple[int, int, int]:
    proc = psutil.Process(pid)
    return proc.num_fds(), proc.memory_info().rss, len(proc.children())


def test_every_malformed_request_is_answered_and_nothing_leaks(capsd: Capsd) -> None:
    rng = random.Random(23)
    all_cases = cases(rng)
    for _name, data, content_type in all_cases[:3]:  # warm up: first imports, first decodes
        post(capsd.api_port, data, content_type)
    fds, rss, children = process_state(capsd.proc.pid)
    for round_ in range(3):
        for name, data, content_type in all_cases:
            status, answer = post(capsd.api_port, data, content_type)
            assert status in (200, 400), (round_, name, status, answer[:300])
            reply = json.loads(answer)
            if status == 200:
                assert set(reply) == {"text"}, name
            else:
                assert set(reply["error"]) == {"message", "type", "param", "code"}, (name, reply)
    assert capsd.proc.poll() is None
    assert post(capsd.api_port, all_cases[-1][1])[1] == b'{"text": "31415"}'
    after = process_state(capsd.proc.pid)
    assert after[0] <= fds + 2, (fds, after[0])  # descriptors: none kept per request
    assert after[1] < rss + 20 * 2**20, (rss >> 20, after[1] >> 20)  # memory: no growth per request
    assert after[2] == children  # no decode process left
    [uploads] = (capsd.config_path.parent / "tmpdir").glob("capsd-api-*")
    assert not any(uploads.iterdir())  # every request's files removed
    assert capsd.status()["api"]["requests_in_progress"] == 0
