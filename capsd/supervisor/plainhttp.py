"""Plain HTTP on the WebSocket port, for balancers and Prometheus (docs/design.md#health-and-metrics).

capsd reads the head of each connection's first request before websockets does: a WebSocket
handshake goes on to websockets; anything else is answered here, one request per connection,
`Connection: close`, and the connection then closed. websockets alone closes in silence what it
cannot parse (a body, chunked, a bad request line) and knows no HEAD.
"""

from __future__ import annotations

import email.utils
import http
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from websockets.asyncio.server import ServerConnection

from capsd.protocol import clip

log = structlog.get_logger("capsd.http")

MAX_HEAD_BYTES = 16 * 2**10  # a request line and headers longer than this: 431
MAX_HTTP_CONNECTIONS = 32  # plain-HTTP connections open at once (answered, closing): beyond it, 503
RETRY_AFTER_S = 1  # what a 503 at that bound asks the client to wait
REFUSED_LOG_S = 1.0  # 503s at the bound are logged at most once a second, with a count
METHODS = "GET, HEAD"
HEAD_END = re.compile(rb"\r?\n\r?\n")
TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")  # a method or a header name (RFC 9110)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased; a repeated header's values joined by ", "

    @property
    def has_body(self) -> bool:
        return "transfer-encoding" in self.headers or self.headers.get("content-length", "0") != "0"


@dataclass(frozen=True)
class Answer:
    status: int
    body: str | bytes  # a str is sent as UTF-8 text/plain
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = "text/plain; charset=utf-8"

    def serialize(self, head_only: bool) -> bytes:
        """The response as bytes; a HEAD's has the GET's status and headers, no body."""
        body = self.body.encode() if isinstance(self.body, str) else self.body
        status = http.HTTPStatus(self.status)
        headers = (("Date", email.utils.formatdate(usegmt=True)), ("Content-Type", self.content_type),
                   ("Content-Length", str(len(body))), ("Connection", "close"), *self.headers)  # fmt: skip
        head = f"HTTP/1.1 {status.value} {status.phrase}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
        return (head + "\r\n").encode("latin-1") + (b"" if head_only else body)


class BadHead(Exception):
    """A request head that is not HTTP/1.x: answered 400."""


def parse_head(head: bytes) -> Request:
    """A request's head (request line and header lines, without the empty line that ends it)."""
    lines = re.split(r"\r?\n", head.decode("latin-1"))
    parts = lines[0].split(" ")
    if len(parts) != 3 or not TOKEN.fullmatch(parts[0]) or not parts[1] or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
        raise BadHead(f"not an HTTP/1.x request line: {clip(lines[0])!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not TOKEN.fullmatch(name):
            raise BadHead(f"not a header line: {clip(line)!r}")
        key, value = name.lower(), value.strip(" \t")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return Request(parts[0], parts[1], headers)


class PlainHttp:
    """Answers the first request of each connection that is no WebSocket handshake; counts the
    connections so answered that are still open, and refuses beyond MAX_HTTP_CONNECTIONS."""

    def __init__(self, answer_path: Callable[[str], Answer]) -> None:
        self.answer_path = answer_path  # what capsd answers a GET on a path
        self.open = 0
        self.refused = 0  # 503s since the last logged
        self.refused_logged = 0.0

    def connection(self, *args: Any, **kwargs: Any) -> HttpFirst:
        """serve()'s create_connection: websockets' connection, with the head read here first."""
        return HttpFirst(self, *args, **kwargs)

    def answer(self, head: bytes) -> bytes | None:
        """The bytes that answer a connection's first bytes (a head, complete or not), or None
        for a WebSocket handshake."""
        end = HEAD_END.search(head)
        if end is None or end.start() > MAX_HEAD_BYTES:
            return Answer(431, f"a request head is at most {MAX_HEAD_BYTES} bytes\n").serialize(False)
        try:
            request = parse_head(head[: end.start()])
        except BadHead as e:
            return Answer(400, f"{e}\n").serialize(False)
        if request.method not in ("GET", "HEAD"):
            return Answer(405, f"capsd answers {METHODS}\n", (("Allow", METHODS),)).serialize(False)
        if "websocket" in request.headers.get("upgrade", "").lower():
            if request.method == "GET" and not request.has_body:
                return None
            return Answer(400, "a WebSocket handshake is a GET without a body\n").serialize(False)
        head_only = request.method == "HEAD"
        if self.open >= MAX_HTTP_CONNECTIONS:
            self.log_refused()
            busy = Answer(503, "capsd: too many HTTP connections\n", (("Retry-After", str(RETRY_AFTER_S)),))
            return busy.serialize(head_only)
        return self.answer_path(request.path).serialize(head_only)

    def log_refused(self) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self.refused_logged >= REFUSED_LOG_S:
            log.warning("http refused", reason="max_http_connections", limit=MAX_HTTP_CONNECTIONS, refused=self.refused)
            self.refused, self.refused_logged = 0, now


class HttpFirst(ServerConnection):
    """websockets' connection (serve()'s documented create_connection hook), but the first
    request's head is read here: a WebSocket handshake is then fed to websockets whole; plain HTTP
    is answered, the write side shut, and what the client still sends read and dropped until its
    end, so that no reset destroys the answer in flight (a lingering close). websockets'
    open_timeout bounds the whole."""

    def __init__(self, plain: PlainHttp, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.plain = plain
        self.head: bytearray | None = bytearray()  # None once the head has gone one way or the other
        self.answered = False

    def data_received(self, data: bytes) -> None:
        if self.head is None:
            if not self.answered:
                super().data_received(data)
            return
        self.head += data
        if not HEAD_END.search(self.head) and len(self.head) <= MAX_HEAD_BYTES:
            return
        head = bytes(self.head)
        answer = self.plain.answer(head)
        if answer is None:
            self.head = None
            super().data_received(head)
        else:
            self.send_answer(answer)

    def eof_received(self) -> None:
        if self.head:  # the client ended before its head did: answered all the same
            self.send_answer(Answer(400, "the request ended before its head did\n").serialize(False))
        if self.head is None and not self.answered:
            super().eof_received()
        # else None: asyncio closes the transport once the answer is written

    def send_answer(self, answer: bytes) -> None:
        self.head, self.answered = None, True
        self.plain.open += 1
        self.transport.write(answer)
        self.transport.write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.answered:
            self.plain.open -= 1
        super().connection_lost(exc)
