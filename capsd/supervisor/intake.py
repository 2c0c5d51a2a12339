"""The daemon-wide bound on the client audio the supervisor holds (docs/design.md#intake).

Every connection's bounds hold one client to a known cost; the intake bounds them all together.
It counts what clients make the supervisor hold: the bytes of WebSocket frames admitted and not
yet parsed, the audio buffered in the tasks' segmenters and the audio queued in the slots. A
connection's bytes pass through `Metered` after its handshake: it reads each frame's header
(RFC 6455 section 5.2, the length only) and gives the frame to websockets only once the intake
has room for all of it; until then the connection is not read, and TCP holds its client back.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

from capsd.memory import DICTATION_RESERVE_BYTES
from capsd.supervisor.plainhttp import HttpFirst, PlainHttp

# A frame this long or shorter (~3 s of audio as CapsWriter sends it: JSON, base64 float32) is
# small: a dictation's. Small frames do not wait behind long ones and have a reserve of their own
# above the budget (memory.DICTATION_RESERVE_BYTES), so that files never lock dictation out
# (docs/design.md#dictation-first).
SMALL_FRAME_BYTES = 256 * 2**10
MAX_HEADER_BYTES = 14  # 2, an extended length of 8, a mask of 4
# websockets' parser keeps the last frame it parsed (a local of its generator) until it parses the
# next one: a connection that waits would hold its last frame, up to max_message_bytes, uncounted.
# An empty pong (which websockets ignores: it answers no ping) makes it let go once capsd has
# taken the message.
EMPTY_PONG = b"\x8a\x80\x00\x00\x00\x00"  # FIN and PONG; masked as a client's frames are; 0 long


def frame_size(head: bytes | bytearray) -> tuple[int, bool, bool] | None:
    """A frame's whole length on the wire, whether it carries data (not a control frame) and
    whether it ends its message, read from its first bytes; None while they do not hold its
    length. Only that is read: websockets parses and checks the frame."""
    if len(head) < 2:
        return None
    length, start = head[1] & 0x7F, 2
    if length >= 126:
        start = 4 if length == 126 else 10
        if len(head) < start:
            return None
        length = int.from_bytes(head[2:start], "big")
    mask = 4 if head[1] & 0x80 else 0
    return start + mask + length, head[0] & 0x0F < 8, bool(head[0] & 0x80)


class Waiter(Protocol):
    """What waits in the intake's lines: a connection's frame (`Metered`), or a chunk of audio
    (`Ticket`); `admitted` is called once it is admitted and counted."""

    next_size: int

    def admitted(self) -> None: ...


class Intake:
    """What every connection together makes the supervisor hold, against `budget` (bytes), and
    the connections waiting for room, oldest first."""

    def __init__(self, budget: Callable[[], int], max_frame: int) -> None:
        self._budget = budget  # the memory plan's, as the pool is now
        self.max_frame = max_frame  # [server] max_message_bytes: a longer frame is refused by websockets
        self.frames = 0  # bytes of frames admitted, not yet parsed
        self.buffered = 0  # audio in the tasks' segmenters
        self.queued = 0  # audio in segments waiting in the slots
        self.waiting: dict[bool, deque[Waiter]] = {True: deque(), False: deque()}  # by small frame
        self.peak = 0  # the most held at once

    @property
    def budget(self) -> int:
        return self._budget()

    @property
    def held(self) -> int:
        return self.frames + self.buffered + self.queued

    def add(self, frames: int = 0, buffered: int = 0, queued: int = 0) -> None:
        """Count bytes held (positive) or let go (negative); what is let go makes room."""
        self.frames += frames
        self.buffered += buffered
        self.queued += queued
        self.peak = max(self.peak, self.held)
        if min(frames, buffered, queued) < 0:
            self.admit_waiting()

    def room_for(self, size: int, small: bool) -> bool:
        """Whether a frame of `size` bytes may come in now. A frame also comes in when no frame is
        being received and no segment waits: what is held then (audio not yet cut) cannot drain
        by waiting, so at least one connection is always read."""
        budget = self.budget + (DICTATION_RESERVE_BYTES if small else 0)
        return self.held + size <= budget or (self.frames == 0 and self.queued == 0)

    def buffered_over(self, urgent: bool) -> bool:
        """Whether the audio not yet cut, of every task, is over its bound: the budget less one of
        the longest frames, so that such a frame fits beside it (for a mic task, dictation's
        reserve too). It cannot drain by waiting (docs/design.md#intake)."""
        return self.buffered > self.budget - self.max_frame + (DICTATION_RESERVE_BYTES if urgent else 0)

    def admit(self, meter: Waiter, size: int, small: bool) -> bool:
        """A frame of `size` bytes starts on `meter`'s connection: admitted (and counted) now, or
        the connection waits in line. A long frame waits behind the long frames already waiting."""
        if (small or not self.waiting[False]) and self.room_for(size, small):
            self.add(frames=size)
            return True
        self.waiting[small].append(meter)
        return False

    def admit_waiting(self) -> None:
        for small in (True, False):
            line = self.waiting[small]
            while line and self.room_for(line[0].next_size, small):
                meter = line.popleft()
                self.add(frames=meter.next_size)
                meter.admitted()  # may wait again, at the end of the line

    def forget(self, meter: Waiter) -> None:
        for line in self.waiting.values():
            if meter in line:
                line.remove(meter)

    @asynccontextmanager
    async def holding(self, size: int) -> AsyncIterator[None]:
        """Inside: `size` bytes of audio that capsd reads itself (an API upload's, decoded) are
        held as a long frame: they come in once admitted, in the line of long frames, and are let
        go on the way out, cancelled or not."""
        ticket = Ticket(size)
        if self.admit(ticket, size, small=False):
            ticket.admitted()
        try:
            await ticket.room.wait()
            yield
        finally:
            self.forget(ticket)
            if ticket.room.is_set():  # admitted, and so counted
                self.add(frames=-size)

    def status(self) -> dict[str, int]:
        return {
            "budget_bytes": self.budget,
            "held_bytes": self.held,
            "peak_bytes": self.peak,
            "connections_waiting": sum(map(len, self.waiting.values())),
        }


class Ticket:
    """A chunk of audio waiting for the intake's room (`Intake.holding`), as a connection's frame
    waits (`Metered`)."""

    def __init__(self, size: int) -> None:
        self.next_size = size
        self.room = asyncio.Event()

    def admitted(self) -> None:
        self.room.set()


class ReadGate:
    """A connection's transport as websockets sees it: reading is paused while websockets (its own
    flow control) or the intake asks."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.holds: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)

    def pause_reading(self) -> None:
        self.hold("websockets", True)

    def resume_reading(self) -> None:
        self.hold("websockets", False)

    def hold(self, who: str, paused: bool) -> None:
        (self.holds.add if paused else self.holds.discard)(who)
        if self.holds:
            self.transport.pause_reading()  # both idempotent
        else:
            self.transport.resume_reading()


class Metered(HttpFirst):
    """websockets' connection (after PlainHttp's first look at it), whose frames come in only as
    the intake has room for them."""

    def __init__(self, intake: Intake, plain: PlainHttp, *args: Any, **kwargs: Any) -> None:
        super().__init__(plain, *args, **kwargs)
        self.intake = intake
        self.backlog = bytearray()  # bytes received, not yet given to websockets
        self.frame_left = 0  # bytes of the admitted frame still to give
        self.next_size = 0  # the length of the frame waiting for room
        self.next_message: tuple[int, bool] = (0, False)  # ... and what it adds to its message
        self.message = 0  # bytes of the frames admitted for the message not yet complete
        self.messages: deque[int] = deque()  # bytes of each complete message not yet delivered
        self.taken = 0  # bytes of messages taken while websockets was in the next frame: let go at its end
        self.waiting = False  # for the intake's room, not read meanwhile
        self.on_wait: Callable[[], None] = lambda: None  # the client's keepalive follows `waiting`

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.gate = ReadGate(transport)  # type: ignore[arg-type]
        super().connection_made(self.gate)  # type: ignore[arg-type]

    def frames_received(self, data: bytes) -> None:
        if self.protocol.state in (State.CLOSING, State.CLOSED):
            ServerConnection.data_received(self, data)  # a close handshake: nothing more is parsed
            return
        if not self.waiting and not self.backlog and len(data) <= self.frame_left:
            self.pass_on(data)  # within a frame admitted: as it came, not copied
            return
        self.backlog += data
        if not self.waiting:
            self.give()

    def give(self) -> None:
        """Give websockets the backlog, frame by frame, as far as the intake admits."""
        while self.backlog:
            if not self.frame_left:
                frame = frame_size(self.backlog[:MAX_HEADER_BYTES])
                if frame is None:
                    return
                size, data, fin = frame
                if data and size <= self.intake.max_frame + MAX_HEADER_BYTES:  # longer: websockets refuses it
                    self.next_size, self.next_message = size, (size, fin)
                    if not self.intake.admit(self, size, size <= SMALL_FRAME_BYTES):
                        self.wait(True)
                        return
                    self.counted()
                self.frame_left = size
            n = min(self.frame_left, len(self.backlog))
            with memoryview(self.backlog) as view:
                chunk = bytes(view[:n])
            del self.backlog[:n]
            self.pass_on(chunk)

    def pass_on(self, chunk: bytes) -> None:
        """Bytes of the admitted frame, to websockets; at the frame's end, websockets has let go
        of the message taken before it."""
        self.frame_left -= len(chunk)
        ServerConnection.data_received(self, chunk)
        if not self.frame_left and self.taken:
            self.intake.add(frames=-self.taken)
            self.taken = 0

    def counted(self) -> None:
        size, fin = self.next_message
        self.message += size
        if fin:
            self.messages.append(self.message)
            self.message = 0

    def admitted(self) -> None:
        """The intake has made room for the frame that waited: it comes in, and reading resumes."""
        self.counted()
        self.frame_left = self.next_size
        self.wait(False)
        self.give()

    def wait(self, waiting: bool) -> None:
        self.waiting = waiting
        self.gate.hold("intake", waiting)
        self.on_wait()

    def took(self) -> None:
        """capsd has taken the next message: websockets lets go of its last frame now, or at the
        end of the next frame if it is inside that one."""
        if not self.frame_left and self.protocol.state is State.OPEN:
            ServerConnection.data_received(self, EMPTY_PONG)

    def parsed(self) -> None:
        """capsd has parsed the message it took, and holds its audio as its own: once websockets
        has let go of the frame, its bytes are no longer held as a frame."""
        if not self.messages:
            return
        size = self.messages.popleft()
        if self.frame_left:  # websockets is inside the next frame: it lets go of this one at its end
            self.taken += size
        else:
            self.intake.add(frames=-size)

    def connection_lost(self, exc: Exception | None) -> None:
        self.intake.forget(self)
        held = sum(self.messages) + self.message + self.taken
        self.messages, self.message, self.taken = deque(), 0, 0
        if held:
            self.intake.add(frames=-held)
        super().connection_lost(exc)
