"""The WebSocket front: CapsWriter clients in, segments to slots, result frames out.

Audio is buffered per (connection, task_id), never per connection (docs/design.md#audio-per-task).
Each connection has an outbox drained by its own writer, so a slow client never stalls a slot.
Everything a client can make grow has a bound here, with an answer at the bound (README, Limits).
"""

from __future__ import annotations

import asyncio
import http
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from capsd.config import ServerConfig
from capsd.protocol import AudioFrame, BadRequest, ErrorCode, Result, clip, parse_frame
from capsd.segment import Segmenter
from capsd.supervisor.holding import MAX_BUFFERED_AUDIO_BYTES, Holding, refusal
from capsd.supervisor.intake import Intake, Metered
from capsd.supervisor.metrics import Metrics
from capsd.supervisor.plainhttp import Answer, PlainHttp
from capsd.supervisor.slot import Slot
from capsd.supervisor.task import Formatting, Task

log = structlog.get_logger("capsd.front")

# Per-connection bounds, so one client cannot grow capsd's memory or work without limit (and the
# bounds of the audio it holds: capsd.supervisor.holding):
MAX_OUTBOX_BYTES = 8 * 2**20  # result frames not yet read by the client: closed with 1008
MAX_OPEN_TASKS = 32  # tasks whose is_final has not arrived: a new one fails with overloaded
MAX_REFUSED_IDS = 1024  # task ids whose frames are dropped until their is_final
INCOMING_QUEUE = 1  # frames websockets holds before it stops reading the socket
OPEN_TIMEOUT_S = 10.0  # a handshake, or a plain-HTTP request and its close, within this: else cut off
CLOSE_TIMEOUT_S = 3.0  # a client that does not answer a close is cut off after this
FLUSH_TIMEOUT_S = 2.0  # at stop: time to parse what has arrived and send what is owed
BAD_FRAME_LOG_S = 1.0  # bad frames are logged at most once a second, with a count
# capsd's own keepalive, websockets' defaults, but only while capsd reads the connection
# (docs/design.md#keepalive-only-while-read): a ping after this long ...
KEEPALIVE_INTERVAL_S = 20.0
KEEPALIVE_TIMEOUT_S = 20.0  # ... and no pong this long after it: the peer is gone, closed with 1011
# The outcome (status, metrics) of each open task of a connection capsd closes
# (docs/design.md#closes-capsd-makes); a client closing its own connection cancels them uncounted.
CLOSED_BY_CAPSD = "connection_closed"


class Client(Holding):
    """One connection: its tasks, what it holds of capsd's memory, and its outbox."""

    def __init__(self, ws: Metered, max_buffered: int, intake: Intake) -> None:
        super().__init__(intake, max_buffered)
        self.ws = ws
        self.receiving: dict[str, Task] = {}  # tasks whose is_final has not arrived
        self.open: set[Task] = set()  # tasks not yet answered with their final frame
        # Ids whose frames are dropped until their is_final, oldest first, each with the final frame
        # it is owed then (docs/design.md#error-frames-wait-for-the-clients-final-frame).
        self.refused: OrderedDict[str, str | None] = OrderedDict()
        self.outbox: asyncio.Queue[str] = asyncio.Queue()
        self.outbox_bytes = 0
        self.reading = False  # waiting for the next frame
        self.held_back = False  # not read until its queued audio drains (wait_for_room)
        self.keepalive: asyncio.Task[None] | None = None  # running while the connection is read
        self.told_seg_duration = False  # a seg_duration above the ceiling is logged once
        self.closed = False
        self.closing: asyncio.Task[None] | None = None

    # -- what the tasks report (task.Owner) ------------------------------------------------------

    def send(self, frame: str, partial: bool = False) -> None:
        """Queue a result frame. A final frame goes out whenever the unread results are within
        their bound, even if it takes them past it (a long task's final frame alone may be 8 MB:
        docs/design.md#long-tasks); a partial frame that would, or anything once past, closes."""
        if self.closed:
            return
        bound = MAX_OUTBOX_BYTES if partial else MAX_OUTBOX_BYTES + len(frame)
        if self.outbox_bytes and self.outbox_bytes + len(frame) > bound:
            self.close(CloseCode.POLICY_VIOLATION, "capsd: client not reading its results", unread_bytes=self.outbox_bytes)
            return
        self.outbox_bytes += len(frame)
        self.outbox.put_nowait(frame)

    def ended(self, task: Task, error_frame: str | None = None) -> None:
        """The task holds nothing more; a failed task's error frame goes out once its client has
        sent its is_final frame."""
        self.open.discard(task)
        self.release(task)
        if self.receiving.get(task.task_id) is task:
            del self.receiving[task.task_id]
            self.refuse(task.task_id, error_frame)
        elif error_frame:
            self.send(error_frame)

    # -- bookkeeping --------------------------------------------------------------------------

    def refuse(self, task_id: str, final_frame: str | None) -> None:
        """Drop this id's frames until its is_final, then send `final_frame`. Beyond the bound the
        oldest id is forgotten, its frame sent at once."""
        self.refused[task_id] = final_frame
        self.refused.move_to_end(task_id)
        if len(self.refused) > MAX_REFUSED_IDS:
            self.send_owed(self.refused.popitem(last=False)[1])

    def dropped(self, task_id: str, is_final: bool) -> bool:
        """A frame of a refused id: dropped, and at its is_final the frame owed is sent."""
        if task_id not in self.refused:
            return False
        if is_final:
            self.send_owed(self.refused.pop(task_id))
        return True

    def send_owed(self, frame: str | None) -> None:
        if frame:
            self.send(frame)

    def release_owed(self) -> None:
        """The connection is closing: every frame owed goes out now."""
        for task_id, frame in self.refused.items():
            self.send_owed(frame)
            self.refused[task_id] = None

    async def wait_for_room(self) -> None:
        """Until capsd may read the connection again. Meanwhile its keepalive is off: the client's
        pong waits in the TCP stream behind the frames capsd does not read
        (docs/design.md#keepalive-only-while-read)."""
        if self.blocked_on() is not None:
            self.held_back = True
            self.run_keepalive()
            closed = asyncio.ensure_future(self.ws.wait_closed())
            try:
                await self.room(closed)
            finally:
                closed.cancel()
            self.held_back = False
        self.run_keepalive()

    def run_keepalive(self) -> None:
        """The keepalive runs while capsd reads the connection: not while it is closed, held back
        by its own bounds, or waiting for the intake's room (docs/design.md#intake)."""
        run = not (self.closed or self.held_back or self.ws.waiting)
        if run and self.keepalive is None:
            self.keepalive = asyncio.get_running_loop().create_task(self._keepalive())
        elif not run and self.keepalive is not None:
            self.keepalive.cancel()
            self.keepalive = None

    async def _keepalive(self) -> None:
        """A peer that does not answer a ping within KEEPALIVE_TIMEOUT_S is gone (a cable pulled,
        a machine asleep): its connection would otherwise hold its tasks until TCP gives up."""
        while True:
            await asyncio.sleep(KEEPALIVE_INTERVAL_S)
            try:
                await asyncio.wait_for(self.round_trip(), KEEPALIVE_TIMEOUT_S)
            except asyncio.TimeoutError:
                self.close(CloseCode.INTERNAL_ERROR, "keepalive ping timeout", timeout_s=KEEPALIVE_TIMEOUT_S)
                return
            except ConnectionClosed:
                return

    async def round_trip(self) -> None:
        """A ping, answered: the pong comes after every frame the client sent before the ping."""
        await (await self.ws.ping())

    async def write(self) -> None:
        try:
            while True:
                frame = await self.outbox.get()
                await self.ws.send(frame)
                self.outbox_bytes -= len(frame)
        except ConnectionClosed:
            pass

    async def settle(self) -> None:
        """Until nothing is half-received and nothing owed, so that the connection may close
        without losing a frame (docs/design.md#stopping). TCP keeps order and a control frame
        never splits a frame, so once the client's pong to a ping sent now has come, every frame it
        sent before has arrived whole; once capsd waits for the next one, they are all parsed."""
        try:
            await self.round_trip()
        except ConnectionClosed:
            return
        while not self.reading:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # polled: once per connection, at a stop
        self.release_owed()  # what the frames parsed meanwhile are owed
        while self.outbox_bytes:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    def cancel_tasks(self) -> None:
        for task in list(self.open):
            task.cancel()

    def close(self, code: int, reason: str, **why: Any) -> asyncio.Task[None]:
        """capsd closes the connection: one log line says why, and every open task is cancelled and
        counted as failed (docs/design.md#closes-capsd-makes); a client that does not answer the
        close is cut off."""
        if self.closing is None:
            (log.info if code == CloseCode.GOING_AWAY else log.warning)(
                "connection closed by capsd", peer=str(self.ws.remote_address), code=int(code), reason=reason,
                tasks=len(self.open), **why)  # fmt: skip
            for task in list(self.open):
                task.cancel()
                task.slot.count(task.source, CLOSED_BY_CAPSD)
            self.closing = asyncio.get_running_loop().create_task(self._close(code, reason))
        self.closed = True
        return self.closing

    async def _close(self, code: int, reason: str) -> None:
        try:
            await asyncio.wait_for(self.ws.close(code, reason), CLOSE_TIMEOUT_S)
        except asyncio.TimeoutError:
            self.ws.transport.abort()


def _binary_if_offered(_connection: ServerConnection, offered: Sequence[str]) -> str | None:
    """CapsWriter v2 clients offer the `binary` subprotocol: echo it. Others offer none: fine too."""
    return "binary" if "binary" in offered else None


class Front:
    def __init__(
        self,
        cfg: ServerConfig,
        home: Callable[[str], Slot],
        formatting: Formatting,
        not_ready: Callable[[], str | None],
        metrics: Metrics,
        client_audio_bytes: Callable[[], int],
    ) -> None:
        self.cfg = cfg
        self.home = home  # a new task's home slot
        self.formatting = formatting
        self.not_ready = not_ready  # why capsd is not ready for new tasks, or None (GET /readyz)
        self.metrics = metrics
        self.admitted: set[ServerConnection] = set()
        self.http = PlainHttp(self.answer_http)
        self.intake = Intake(client_audio_bytes, cfg.max_message_bytes)
        self.clients: set[Client] = set()
        self.server: Server | None = None
        self.accepting = True  # False while stopping: new tasks are refused with shutting_down
        self.background: set[asyncio.Task[Any]] = set()
        self.bad_frames = 0  # since the last one logged
        self.bad_frame_logged = 0.0

    async def start(self) -> None:
        self.server = await serve(
            self.handle,
            self.cfg.addr,
            self.cfg.port,
            max_size=self.cfg.max_message_bytes,  # a CapsWriter file frame is ~5.1 MB (docs/design.md#frame-size)
            process_request=self.admit,
            create_connection=self.connection,
            max_queue=INCOMING_QUEUE,
            ping_interval=None,  # capsd runs its own (docs/design.md#keepalive-only-while-read)
            compression=None,
            open_timeout=OPEN_TIMEOUT_S,
            close_timeout=CLOSE_TIMEOUT_S,
            select_subprotocol=_binary_if_offered,
        )
        log.info("listening", addr=self.cfg.addr, port=self.cfg.port)

    def connection(self, *args: Any, **kwargs: Any) -> Metered:
        """serve()'s create_connection: plain HTTP answered first (docs/design.md#health-and-metrics),
        then frames admitted by the intake (docs/design.md#intake)."""
        return Metered(self.intake, self.http, *args, **kwargs)

    def keep(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def admit(self, connection: ServerConnection, request: Request) -> Response | None:
        """A WebSocket handshake (plain HTTP never gets here: PlainHttp answers it)."""
        if not self.accepting:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "capsd is stopping\n")
        # Counted at the handshake, not in the handler, so a burst of handshakes cannot overshoot.
        if len(self.admitted) >= self.cfg.max_connections:
            log.warning("connection refused", reason="max_connections", limit=self.cfg.max_connections)
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "capsd: too many connections\n")
        self.admitted.add(connection)
        self.keep(self._release(connection))
        return None

    def answer_http(self, path: str) -> Answer:
        """A plain GET (or HEAD) on the WebSocket port: health for a balancer, metrics for
        Prometheus, where clients connect (docs/design.md#health-and-metrics)."""
        path = path.split("?", 1)[0]
        if path == "/livez":  # this answer needs the supervisor's event loop: alive
            return Answer(200, "alive\n")
        if path == "/readyz":
            reason = self.not_ready()
            return Answer(200, "ready\n") if reason is None else Answer(503, reason + "\n")
        if path == "/metrics" and self.cfg.metrics:
            return Answer(200, self.metrics.exposition(), content_type=CONTENT_TYPE_LATEST)
        return Answer(404, "not found: capsd answers /livez, /readyz, /metrics\n")

    async def _release(self, connection: ServerConnection) -> None:
        await connection.wait_closed()
        self.admitted.discard(connection)

    @property
    def max_buffered(self) -> int:
        # One whole frame of audio always fits (a v1.x client sends a file as one frame).
        return max(MAX_BUFFERED_AUDIO_BYTES, self.cfg.max_message_bytes * 3 // 4)

    async def handle(self, ws: Metered) -> None:
        client = Client(ws, self.max_buffered, self.intake)
        ws.on_wait = client.run_keepalive
        self.clients.add(client)
        writer = asyncio.create_task(client.write())
        try:
            while not client.closed:
                await client.wait_for_room()
                client.reading = True
                raw = await ws.recv()
                client.reading = False
                ws.took()  # websockets lets go of its frame (docs/design.md#intake)
                try:
                    parsed: AudioFrame | BadRequest = parse_frame(raw)
                except BadRequest as e:
                    parsed = e
                # Neither the text (up to 16 MiB) nor its audio is held longer than it takes to
                # parse and cut it: not while the next frame is awaited (docs/design.md#intake).
                del raw
                self.receive(client, parsed)
                del parsed
                ws.parsed()
        except ConnectionClosed as e:
            if e.sent and not e.rcvd_then_sent:  # websockets closed it for capsd: a frame over max_size, ...
                if e.sent.code == CloseCode.MESSAGE_TOO_BIG:
                    client.close(e.sent.code, f"frame too big: {e.sent.reason}",
                                 max_message_bytes=self.cfg.max_message_bytes)  # fmt: skip
                else:  # ... or a protocol error
                    client.close(e.sent.code, e.sent.reason)
        finally:
            client.closed = True
            client.run_keepalive()
            self.clients.discard(client)
            if client.open:
                log.info("connection closed: tasks cancelled", peer=str(ws.remote_address), tasks=len(client.open))
                client.cancel_tasks()
            writer.cancel()

    def receive(self, client: Client, frame: AudioFrame | BadRequest) -> None:
        if isinstance(frame, BadRequest):
            self.refuse_frame(client, frame)
            return
        if client.dropped(frame.task_id, frame.is_final):
            return
        task = client.receiving.get(frame.task_id) or self.open_task(client, frame)
        if task is None:
            return
        if frame.is_final:
            del client.receiving[task.task_id]
            task.final_received = time.monotonic()
        client.feed(task, frame.samples, frame.is_final)

    def open_task(self, client: Client, frame: AudioFrame) -> Task | None:
        """A new task, or None when it is refused (with its final frame)."""
        slot = self.home(frame.task_id)
        refused = refusal(slot, frame.source == "mic", self.accepting)
        if refused is None and len(client.receiving) >= MAX_OPEN_TASKS:
            refused = (ErrorCode.OVERLOADED, f"{MAX_OPEN_TASKS} tasks are already open on this connection")
        if refused is None:
            if frame.asked_seg_duration > frame.seg_duration and not client.told_seg_duration:
                client.told_seg_duration = True
                log.info("seg_duration served as the ceiling", peer=str(client.ws.remote_address),
                         task=clip(frame.task_id), asked=frame.asked_seg_duration, served=frame.seg_duration)  # fmt: skip
            segmenter = Segmenter(frame.seg_duration, frame.seg_overlap)
            task = Task(frame.task_id, frame.source, frame.time_start, slot, segmenter, client, self.formatting)
            client.receiving[frame.task_id] = task
            client.open.add(task)
            slot.accept(task)
            return task
        now = time.time()
        slot.count(frame.source, refused[0])
        log.warning("task refused", slot=slot.index, task=clip(frame.task_id), code=str(refused[0]), reason=refused[1])
        error_frame = Result(frame.task_id, frame.time_start, now, now).to_json(error=refused)
        if frame.is_final:
            client.send(error_frame)
        else:
            client.refuse(frame.task_id, error_frame)
        return None

    def refuse_frame(self, client: Client, e: BadRequest) -> None:
        """A malformed frame: one complete error frame; the connection and other tasks go on."""
        self.log_bad_frame(client, e)
        if e.task_id and client.dropped(e.task_id, e.is_final):
            return
        task = client.receiving.get(e.task_id) if e.task_id else None
        if task is not None:
            if e.is_final:
                del client.receiving[task.task_id]
            task.fail(ErrorCode.BAD_REQUEST, str(e))  # a task missing a frame cannot be exact
            return
        now = time.time()
        time_start = now if e.time_start is None else e.time_start
        error_frame = Result(e.task_id, time_start, now, now).to_json(error=(ErrorCode.BAD_REQUEST, str(e)))
        if e.task_id:  # a task refused at its first frame
            self.home(e.task_id).count(e.source, ErrorCode.BAD_REQUEST)
        else:
            self.metrics.bad_frames.inc()
        if e.task_id and not e.is_final:
            client.refuse(e.task_id, error_frame)
        else:
            client.send(error_frame)

    def log_bad_frame(self, client: Client, e: BadRequest) -> None:
        self.bad_frames += 1
        now = time.monotonic()
        if now - self.bad_frame_logged >= BAD_FRAME_LOG_S:
            log.info("bad frame", peer=str(client.ws.remote_address), task=e.task_id and clip(e.task_id),
                     reason=str(e), bad_frames=self.bad_frames)  # fmt: skip
            self.bad_frames, self.bad_frame_logged = 0, now

    def stop_accepting(self) -> None:
        """From the first moment of a stop: new tasks and connections are refused, /readyz says
        503, and the port keeps listening so that a balancer can see it."""
        self.accepting = False

    async def close(self) -> None:
        """Close every connection at once, each when what it sent is parsed and what it is owed
        is written (at most FLUSH_TIMEOUT_S), a client that does not answer cut off."""
        if self.server:
            self.server.close(close_connections=False)
        await asyncio.gather(*(self._close_client(client) for client in list(self.clients)))
        if self.server:
            await asyncio.wait([asyncio.ensure_future(self.server.wait_closed())], timeout=CLOSE_TIMEOUT_S)

    async def _close_client(self, client: Client) -> None:
        client.release_owed()
        try:
            await asyncio.wait_for(client.settle(), FLUSH_TIMEOUT_S)
        except asyncio.TimeoutError:
            pass
        await client.close(CloseCode.GOING_AWAY, "capsd is stopping")
