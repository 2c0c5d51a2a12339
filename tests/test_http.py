"""Plain HTTP on the WebSocket port answered as HTTP: every method, body and framing gets an
answer, one request per connection, and a flood of scrapers costs little (a real capsd, with a
CapsWriter dictation alongside; docs/design.md#health-and-metrics)."""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import h11
import pytest

from capsd.supervisor.plainhttp import MAX_HEAD_BYTES, MAX_HTTP_CONNECTIONS, Answer, PlainHttp, read_head
from tests.support.checks import dictate, http_get, scrape, wait_for

Response = tuple[int, dict[str, str], bytes]
GET_LIVEZ = b"GET /livez HTTP/1.1\r\nHost: capsd\r\n\r\n"


def alongside(capsd: Any, work: Callable[[], Any]) -> Any:
    """`work` in a thread while a CapsWriter dictation runs on the same capsd, answered exact."""

    async def both() -> Any:
        result, _ = await asyncio.gather(asyncio.to_thread(work), dictate(capsd.url, "dictation"))
        return result

    return asyncio.run(both())


def parse(raw: bytes, head_only: bool = False) -> list[Response]:
    """The responses in what capsd sent, each by its Content-Length (none after a HEAD)."""
    responses = []
    while raw:
        head, _, raw = raw.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        length = 0 if head_only else int(headers["content-length"])
        responses.append((int(status_line.split(" ")[1]), headers, raw[:length]))
        raw = raw[length:]
    return responses


def exchange(port: int, *requests: bytes, shut: bool = False) -> bytes:
    """Send each request on one raw socket (the first alone, the others once its answer is read),
    then read all capsd sends until its end; no reset may destroy it."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        received = b""
        for n, request in enumerate(requests):
            s.sendall(request)
            if shut and n == len(requests) - 1:
                s.shutdown(socket.SHUT_WR)
            while n == 0 and len(requests) > 1 and b"\r\n\r\n" not in received:
                received += s.recv(65536)
        while chunk := s.recv(65536):
            received += chunk
    return received


def request(port: int, method: str, path: str, body: bytes | None = None) -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def read(data: bytes, parser: h11.Connection | None = None) -> h11.Request | h11.RemoteProtocolError | None:
    parser = parser or h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    return read_head(parser, data)


@pytest.mark.unit
def test_request_heads_are_read_by_h11_and_bad_ones_get_400_or_431() -> None:
    request = read(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nupgrade: WebSocket\r\n\r\n")
    assert isinstance(request, h11.Request)
    assert (request.method, request.target) == (b"GET", b"/metrics?x=1")
    assert [value for name, value in request.headers if name == b"upgrade"] == [b"h2c", b"WebSocket"]
    too_long = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"y" * MAX_HEAD_BYTES + b"\r\n\r\n"
    for head, status in [(b"HELLO\r\n\r\n", 400), (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", 400),
                         (b"GET / HTTP/1.1\r\n\r\n", 400), (too_long, 431)]:  # fmt: skip
        error = read(head)  # the third has no Host, which HTTP/1.1 requires
        assert isinstance(error, h11.RemoteProtocolError) and error.error_status_hint == status, head[:40]
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    assert all(read(too_long[i : i + 1024], parser) is None for i in range(0, MAX_HEAD_BYTES, 1024))
    assert getattr(read(too_long[MAX_HEAD_BYTES:], parser), "error_status_hint", None) == 431  # in pieces too
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    assert read(b"GET / HTTP/1.1\r\nHost:", parser) is None
    assert getattr(read(b"", parser), "error_status_hint", None) == 400  # the client ended before its head did
    assert read(b"") is None  # it ended without a byte: nothing to answer


@pytest.mark.unit
def test_plain_http_heads_are_answered_without_sockets() -> None:
    plain = PlainHttp(lambda path: Answer(200, f"{path}\n"))

    def answer(data: bytes) -> bytes | None:
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        head = read(data, parser)
        assert head is not None
        return plain.answer(parser, head)

    handshake = b"GET / HTTP/1.1\r\nHost: c\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    assert answer(handshake) is None  # for websockets
    assert answer(handshake.replace(b"\r\n\r\n", b"\r\nContent-Length: 1\r\n\r\nx")).startswith(b"HTTP/1.1 400 ")
    assert answer(b"GET /x HTTP/1.1\r\nHost: c\r\n\r\n").endswith(b"\r\n\r\n/x\n")
    assert answer(b"HEAD /x HTTP/1.1\r\nHost: c\r\n\r\n").endswith(b"Content-Length: 3\r\nConnection: close\r\n\r\n")
    assert answer(b"OPTIONS * HTTP/1.1\r\nHost: c\r\n\r\n").startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert answer(b"GET / HTTP/2.0\r\nHost: c\r\n\r\n").startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n")
    assert answer(b"HELLO\r\n\r\n").startswith(b"HTTP/1.1 400 Bad Request\r\n")


@pytest.mark.integration
def test_head_answers_as_get_without_a_body(start_capsd: Any) -> None:
    capsd = start_capsd()

    def work() -> list[tuple[list[Response], list[Response]]]:
        return [
            (parse(exchange(capsd.port, f"GET {path} HTTP/1.1\r\nHost: capsd\r\n\r\n".encode())),
             parse(exchange(capsd.port, f"HEAD {path} HTTP/1.1\r\nHost: capsd\r\n\r\n".encode()), head_only=True))
            for path in ("/livez", "/readyz", "/metrics", "/elsewhere")
        ]  # fmt: skip

    for (path, status), ([get], [head]) in zip(
        [("/livez", 200), ("/readyz", 200), ("/metrics", 200), ("/elsewhere", 404)], alongside(capsd, work)
    ):
        assert get[0] == head[0] == status, path
        assert head[2] == b"" and get[2], path  # parse() kept every byte after the HEAD's head
        assert get[1]["connection"] == head[1]["connection"] == "close"
        assert get[1]["content-type"] == head[1]["content-type"]
        if path != "/metrics":  # its exposition may be recomputed between the two
            assert get[1]["content-length"] == head[1]["content-length"]


@pytest.mark.integration
def test_other_methods_405_with_allow_even_with_a_body(start_capsd: Any) -> None:
    capsd = start_capsd()

    def work() -> list[Response]:
        return [request(capsd.port, "POST", "/livez", b"x" * 2**20), request(capsd.port, "POST", "/metrics"),
                request(capsd.port, "PUT", "/readyz", b"{}"), request(capsd.port, "DELETE", "/metrics")]  # fmt: skip

    for status, headers, body in alongside(capsd, work):
        assert status == 405 and headers["allow"] == "GET, HEAD" and headers["connection"] == "close"
        assert body == b"capsd answers GET, HEAD\n"


@pytest.mark.integration
def test_one_request_per_connection_answered_then_closed(start_capsd: Any) -> None:
    """Keep-alive and pipelining: the first request is answered with Connection: close, and
    capsd ends the connection; what the client sent after it is read and dropped, no reset."""
    capsd = start_capsd()

    def work() -> dict[str, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", capsd.port, timeout=30)
        try:  # a keep-alive client: it sees Connection: close and opens a new connection
            statuses = []
            for path in ("/metrics", "/livez", "/metrics"):
                conn.request("GET", path)
                r = conn.getresponse()
                r.read()
                statuses.append(r.status)
        finally:
            conn.close()
        readyz = b"GET /readyz HTTP/1.1\r\nHost: capsd\r\n\r\n"
        return {
            "keep-alive": statuses,
            "second": parse(exchange(capsd.port, GET_LIVEZ, readyz)),
            "pipelined": parse(exchange(capsd.port, GET_LIVEZ + readyz)),
            "metrics then more": parse(exchange(capsd.port, b"GET /metrics HTTP/1.1\r\nHost: capsd\r\n\r\n", readyz)),
        }

    answers = alongside(capsd, work)
    assert answers["keep-alive"] == [200, 200, 200]
    for case in ("second", "pipelined"):
        [(status, headers, body)] = answers[case]
        assert (status, headers["connection"], body) == (200, "close", b"alive\n"), case
    [(status, headers, body)] = answers["metrics then more"]
    assert status == 200 and headers["connection"] == "close" and b"capsd_tasks" in body


@pytest.mark.integration
def test_bodies_chunks_and_bad_heads_are_answered_as_http_says(start_capsd: Any) -> None:
    capsd = start_capsd()
    cases = {
        "chunked": (b"GET /livez HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 200),
        "content-length": (b"GET /livez HTTP/1.1\r\nHost: c\r\nContent-Length: 5\r\n\r\nhello", 200),
        "HTTP/1.0": (b"GET /readyz HTTP/1.0\r\n\r\n", 200),
        "bare LF": (b"GET /livez HTTP/1.1\nHost: c\n\n", 200),
        "not HTTP": (b"HELLO\r\n\r\n", 400),
        "bad header": (b"GET /livez HTTP/1.1\r\nno colon\r\n\r\n", 400),
        "WebSocket handshake with a body": (
            b"GET / HTTP/1.1\r\nHost: c\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: 1\r\n\r\nx", 400),
        "WebSocket POST": (b"POST / HTTP/1.1\r\nHost: c\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 405),
        "head too long": (b"GET /livez HTTP/1.1\r\nX: " + b"y" * MAX_HEAD_BYTES + b"\r\n\r\n", 431),
    }  # fmt: skip

    def work() -> dict[str, list[Response]]:
        answers = {case: parse(exchange(capsd.port, data)) for case, (data, _) in cases.items()}
        answers["cut short"] = parse(exchange(capsd.port, b"GET /livez HTTP/1.1\r\nHost:", shut=True))
        return answers

    answers = alongside(capsd, work)
    for case, (_, status) in [*cases.items(), ("cut short", (b"", 400))]:
        [(got, headers, _)] = answers[case]
        assert (got, headers["connection"]) == (status, "close"), case
    assert answers["chunked"][0][2] == b"alive\n"


@pytest.mark.integration
def test_a_flood_of_scrapes_computes_the_exposition_once_a_second(start_capsd: Any) -> None:
    capsd = start_capsd()
    flood_s, threads = 3.0, 100
    statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def scraper(until: float) -> None:
        while time.monotonic() < until:
            status, _ = http_get(capsd.port, "/metrics")
            with lock:
                statuses[status] += 1

    def flood() -> float:
        started = time.monotonic()
        before = scrape(capsd)[("capsd_metrics_expositions_total", ())]
        pool = [threading.Thread(target=scraper, args=(time.monotonic() + flood_s,)) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        time.sleep(1.0)  # the next scrape is computed afresh
        after = scrape(capsd)[("capsd_metrics_expositions_total", ())]
        return after - before, time.monotonic() - started

    computed, elapsed = alongside(capsd, flood)
    assert statuses.keys() <= {200, 503}, statuses  # 503: beyond MAX_HTTP_CONNECTIONS at once
    assert 1 <= computed <= elapsed + 1, (computed, elapsed)  # once per EXPOSITION_INTERVAL_S (1 s)
    assert statuses[200] >= 10 * computed, (statuses, computed)


@pytest.mark.integration
def test_plain_http_connections_beyond_the_bound_get_503(start_capsd: Any) -> None:
    """Connections answered but not yet closed by their client count against the bound; a
    WebSocket client is not held back by them."""
    capsd = start_capsd()

    def work() -> tuple[Response, Response]:
        held = [socket.create_connection(("127.0.0.1", capsd.port), timeout=30) for _ in range(MAX_HTTP_CONNECTIONS)]
        try:
            for s in held:
                s.sendall(GET_LIVEZ)
            for s in held:  # each answered: capsd now waits for its client's end
                received = b""
                while not received.endswith(b"alive\n"):
                    received += s.recv(65536)
            [beyond] = parse(exchange(capsd.port, GET_LIVEZ))
            [head] = parse(exchange(capsd.port, GET_LIVEZ.replace(b"GET", b"HEAD")), head_only=True)
        finally:
            for s in held:
                s.close()
        return beyond, head

    beyond, head = alongside(capsd, work)
    for status, headers, _ in (beyond, head):
        assert (status, headers["retry-after"], headers["connection"]) == (503, "1", "close")
    assert beyond[2] == b"capsd: too many HTTP connections\n" and head[2] == b""
    wait_for(lambda: http_get(capsd.port, "/livez")[0] == 200, 30, "the held connections, closed, to count no more")
    assert "http refused" in capsd.logs()
