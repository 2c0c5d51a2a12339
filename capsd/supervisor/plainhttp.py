"""Plain HTTP on the WebSocket port, for balancers and Prometheus (docs/design.md#health-and-metrics).

capsd reads the head of each connection's first request, with h11, before websockets does: a
WebSocket handshake goes on to websockets; anything else is answered here (written by h11), one
request per connection, `Connection: close`, and the connection then closed. websockets alone
closes in silence what it cannot parse (a body, chunked, a bad request line) and knows no HEAD.
"""

from __future__ import annotations

import email.utils
import http
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h11
import structlog
from websockets.asyncio.server import ServerConnection

from capsd.protocol import clip

log = structlog.get_logger("capsd.http")

MAX_HEAD_BYTES = 16 * 2**10  # h11 holds at most this much of a head that has not ended: beyond it, 431
MAX_HTTP_CONNECTIONS = 32  # plain-HTTP connections open at once (answered, closing): beyond it, 503
RETRY_AFTER_S = 1  # what a 503 at that bound asks the client to wait
REFUSED_LOG_S = 1.0  # 503s at the bound are logged at most once a second, with a count
METHODS = "GET, HEAD"


@dataclass(frozen=True)
class Answer:
    status: int
    body: str | bytes  # a str is sent as UTF-8 text/plain
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = "text/plain; charset=utf-8"

    def write(self, parser: h11.Connection, head_only: bool = False) -> bytes:
        """The response, written by h11 on the connection that read the request. A HEAD's has
        the GET's status and headers and no body (h11 refuses one)."""
        body = self.body.encode() if isinstance(self.body, str) else self.body
        headers = [("Date", email.utils.formatdate(usegmt=True)), ("Content-Type", self.content_type),
                   ("Content-Length", str(len(body))), ("Connection", "close"), *self.headers]  # fmt: skip
        response = h11.Response(status_code=self.status, reason=http.HTTPStatus(self.status).phrase, headers=headers)
        events = [response, *([] if head_only else [h11.Data(data=body)]), h11.EndOfMessage()]
        return b"".join(parser.send(event) or b"" for event in events)


def read_head(parser: h11.Connection, data: bytes) -> h11.Request | h11.RemoteProtocolError | None:
    """Gives h11 a connection's next bytes (b"" at its end). Returns the request whose head has
    now ended; or h11's error for a head it refuses, whose error_status_hint is the answer (400
    for a bad head or one the client ended early, 431 for one over MAX_HEAD_BYTES); or None: no
    head yet."""
    if data:
        # h11 checks its limit only on a head it is still waiting for: given at most a byte more,
        # a head too long gets 431 even when it arrives in one piece. Until a head ends h11 holds
        # all it was given, at most MAX_HEAD_BYTES, so at least that byte goes in.
        data = data[: MAX_HEAD_BYTES + 1 - len(parser.trailing_data[0])]
    parser.receive_data(data)
    try:
        event = parser.next_event()
    except h11.RemoteProtocolError as e:
        return e
    return event if isinstance(event, h11.Request) else None  # NEED_DATA, or ConnectionClosed before a byte


def without_body(parser: h11.Connection) -> bool:
    """Whether the request h11 has just read ends at its head (h11 knows the framing)."""
    try:
        return isinstance(parser.next_event(), h11.EndOfMessage)
    except h11.RemoteProtocolError:  # a body h11 cannot read (a bad chunk)
        return False


class PlainHttp:
    """Answers the first request of each connection that is no WebSocket handshake; counts the
    connections so answered that are still open, and refuses beyond MAX_HTTP_CONNECTIONS."""

    def __init__(self, answer_path: Callable[[str], Answer]) -> None:
        self.answer_path = answer_path  # what capsd answers a GET on a path
        self.open = 0
        self.refused = 0  # 503s since the last logged
        self.refused_logged = 0.0

    def answer(self, parser: h11.Connection, head: h11.Request | h11.RemoteProtocolError) -> bytes | None:
        """The bytes that answer a connection's first request, or None for a WebSocket handshake."""
        if isinstance(head, h11.RemoteProtocolError):
            status = head.error_status_hint
            return Answer(status, f"{http.HTTPStatus(status).phrase}: {clip(str(head))}\n").write(parser)
        answer = self.choose(parser, head)
        return None if answer is None else answer.write(parser, head_only=head.method == b"HEAD")

    def choose(self, parser: h11.Connection, request: h11.Request) -> Answer | None:
        """What answers a request that h11 has read, or None for a WebSocket handshake."""
        if not request.http_version.startswith(b"1."):  # h11 reads any HTTP/x.y
            return Answer(505, "capsd answers HTTP/1.x\n")
        if request.method not in (b"GET", b"HEAD"):
            return Answer(405, f"capsd answers {METHODS}\n", (("Allow", METHODS),))
        if any(name == b"upgrade" and b"websocket" in value.lower() for name, value in request.headers):
            if request.method == b"GET" and without_body(parser):
                return None
            return Answer(400, "a WebSocket handshake is a GET without a body\n")
        if self.open >= MAX_HTTP_CONNECTIONS:
            self.log_refused()
            return Answer(503, "capsd: too many HTTP connections\n", (("Retry-After", str(RETRY_AFTER_S)),))
        return self.answer_path(request.target.decode("ascii"))  # h11 lets only visible ASCII through

    def log_refused(self) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self.refused_logged >= REFUSED_LOG_S:
            log.warning("http refused", reason="max_http_connections", limit=MAX_HTTP_CONNECTIONS, refused=self.refused)
            self.refused, self.refused_logged = 0, now


class HttpFirst(ServerConnection):
    """websockets' connection (serve()'s documented create_connection hook), but the first
    request's head is read here, by h11: a WebSocket handshake is then fed to websockets, and what
    follows it goes through `frames_received` (intake.Metered admits it frame by frame);
    plain HTTP is answered, the write side shut, and what the client still sends read and dropped
    until its end, so that no reset destroys the answer in flight (a lingering close).
    websockets' open_timeout bounds the whole."""

    def __init__(self, plain: PlainHttp, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.plain = plain
        # None once websockets has the connection
        self.parser: h11.Connection | None = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.received = bytearray()  # the first bytes as they came, for websockets if a handshake
        self.answered = False

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return  # dropped: the lingering close reads until the client's end
        if self.parser is None:
            self.frames_received(data)
            return
        self.received += data
        self.read(self.parser, data)

    def eof_received(self) -> None:
        if self.parser is not None and not self.answered:
            self.read(self.parser, b"")  # a head cut short is answered (400); no byte at all is not
        if self.parser is None:
            super().eof_received()
        # else None: asyncio closes the transport once the answer, if any, is written

    def read(self, parser: h11.Connection, data: bytes) -> None:
        head = read_head(parser, data)
        if head is None:
            return
        answer = self.plain.answer(parser, head)
        if answer is None:  # a WebSocket handshake, for websockets from its first byte
            self.parser = None
            end = self.received.find(b"\r\n\r\n") + 4  # as websockets reads it (h11 would take a bare LF)
            end = len(self.received) if end < 4 else end
            super().data_received(bytes(self.received[:end]))
            if end < len(self.received):
                self.frames_received(bytes(self.received[end:]))
        else:
            self.answered = True
            self.plain.open += 1
            self.transport.write(answer)
            self.transport.write_eof()
        self.received.clear()

    def frames_received(self, data: bytes) -> None:
        """What follows a WebSocket handshake (intake.Metered admits it frame by frame)."""
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.answered:
            self.plain.open -= 1
        super().connection_lost(exc)
