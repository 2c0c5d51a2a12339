"""The WebSocket front: CapsWriter clients in, segments to slots, result frames out.

Audio is buffered per (connection, task_id), never per connection (pitfalls 4). Each
connection has an outbox drained by its own writer, so a slow client never stalls a slot.
"""

from __future__ import annotations

import asyncio
import http
from collections.abc import Sequence

import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from capsd.config import ServerConfig
from capsd.protocol import AudioFrame, BadRequest, Result, parse_frame, route
from capsd.segment import Segmenter
from capsd.supervisor.slot import Slot
from capsd.supervisor.task import Task

log = structlog.get_logger("capsd.front")

# Per-connection bounds, so one client cannot grow capsd's memory without limit:
MAX_BUFFERED_AUDIO_BYTES = 64 * 2**20  # audio waiting to be cut into segments (~17 min of float32)
MAX_OUTBOX_BYTES = 32 * 2**20  # result frames the client has not read yet
INCOMING_QUEUE = 4  # frames websockets may hold before it stops reading the socket


class Client:
    """One connection's tasks and its outbox."""

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.tasks: dict[str, Task] = {}  # open tasks, and failed ones until their final frame
        self.dropped: set[str] = set()  # task ids refused before they had a task
        self.outbox: asyncio.Queue[str] = asyncio.Queue()
        self.outbox_bytes = 0

    def send(self, frame: str) -> None:
        if self.outbox_bytes + len(frame) > MAX_OUTBOX_BYTES:
            if not self.ws.close_code:
                log.warning(
                    "client not reading: closing", peer=str(self.ws.remote_address), unread_bytes=self.outbox_bytes
                )
                asyncio.get_running_loop().create_task(self.ws.close(1008, "capsd: results not read"))
            return
        self.outbox_bytes += len(frame)
        self.outbox.put_nowait(frame)

    async def write(self) -> None:
        while True:
            frame = await self.outbox.get()
            await self.ws.send(frame)
            self.outbox_bytes -= len(frame)

    def buffered_audio_bytes(self) -> int:
        return sum(task.segmenter.buffered_bytes for task in self.tasks.values())


class Front:
    def __init__(self, cfg: ServerConfig, slots: Sequence[Slot]) -> None:
        self.cfg = cfg
        self.slots = slots
        self.admitted: set[ServerConnection] = set()
        self.clients: set[Client] = set()
        self.server: Server | None = None
        self.accepting = True  # False while stopping: new tasks are refused with shutting_down

    async def start(self) -> None:
        self.server = await serve(
            self.handle,
            self.cfg.addr,
            self.cfg.port,
            max_size=self.cfg.max_message_bytes,  # websockets' 1 MiB default refuses a CapsWriter file frame (pitfalls 7)
            process_request=self.admit,
            max_queue=INCOMING_QUEUE,
            compression=None,
        )
        log.info("listening", addr=self.cfg.addr, port=self.cfg.port)

    def admit(self, connection: ServerConnection, request: Request) -> Response | None:
        # Counted at the handshake, not in the handler, so a burst of handshakes cannot overshoot.
        if len(self.admitted) >= self.cfg.max_connections:
            log.warning("connection refused", reason="max_connections", limit=self.cfg.max_connections)
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "capsd: too many connections\n")
        self.admitted.add(connection)
        asyncio.get_running_loop().create_task(self._release(connection))
        return None

    async def _release(self, connection: ServerConnection) -> None:
        await connection.wait_closed()
        self.admitted.discard(connection)

    async def handle(self, ws: ServerConnection) -> None:
        client = Client(ws)
        self.clients.add(client)
        writer = asyncio.create_task(client.write())
        try:
            async for raw in ws:
                self.receive(client, raw)
        except ConnectionClosed:
            pass
        finally:
            self.clients.discard(client)
            for task in client.tasks.values():
                if not task.done:
                    task.slot.cancel(task)
            writer.cancel()

    def receive(self, client: Client, raw: str | bytes) -> None:
        try:
            frame = parse_frame(raw)
        except BadRequest as e:
            self.refuse(client, e)
            return
        if frame.task_id in client.dropped:
            if frame.is_final:
                client.dropped.discard(frame.task_id)
            return
        task = client.tasks.get(frame.task_id)
        if task is None:
            task = self.open_task(client, frame)
            if not self.accepting:  # tasks in progress may finish; new ones cannot
                task.fail("shutting_down", "capsd is stopping")
        if not task.done and client.buffered_audio_bytes() + frame.samples.nbytes > MAX_BUFFERED_AUDIO_BYTES:
            task.fail(
                "overloaded", f"more than {MAX_BUFFERED_AUDIO_BYTES >> 20} MiB of audio buffered on this connection"
            )
        if not task.done:
            for segment in task.segmenter.feed(frame.samples, frame.is_final):
                if segment.index == 0 and not task.slot.accepts_new_task():
                    task.fail("overloaded", f"slot {task.slot.index} has {len(task.slot.queue)} segments waiting")
                    break
                task.slot.submit(task, segment)
        if frame.is_final:
            del client.tasks[frame.task_id]

    def open_task(self, client: Client, frame: AudioFrame) -> Task:
        slot = self.slots[route(frame.task_id, len(self.slots))]
        segmenter = Segmenter(frame.seg_duration, frame.seg_overlap)
        task = Task(frame.task_id, frame.source, frame.time_start, slot, segmenter, client.send)
        client.tasks[frame.task_id] = task
        return task

    def refuse(self, client: Client, e: BadRequest) -> None:
        """A malformed frame: one complete error frame; the connection and other tasks go on."""
        log.info("bad frame", task=e.task_id, reason=str(e))
        task = client.tasks.get(e.task_id) if e.task_id else None
        if task is not None:
            task.fail("bad_request", str(e))  # a task missing a frame cannot be exact
            if e.is_final:
                del client.tasks[task.task_id]
            return
        client.send(Result(e.task_id).to_json(error=("bad_request", str(e))))
        if e.task_id and not e.is_final:
            client.dropped.add(e.task_id)

    def stop_accepting(self) -> None:
        self.accepting = False
        if self.server:
            self.server.close(close_connections=False)

    async def close(self) -> None:
        """Close every connection once its outbox is flushed, then the server."""
        for client in list(self.clients):
            for _ in range(40):
                if client.outbox.empty():
                    break
                await asyncio.sleep(0.05)
            await client.ws.close(1001, "capsd is stopping")
        if self.server:
            await self.server.wait_closed()
