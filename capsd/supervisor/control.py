"""The control socket: one JSON request line in (`capsd.control_protocol`), one JSON reply line out.

Mode 0660: root and the service's group may control capsd; anyone else cannot connect.
capsd takes its socket path only when nothing is there or a stale socket is (`capsd.socketpath`),
and at stop removes the path only while it is still the socket capsd bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import structlog

from capsd.control_protocol import DRAIN_TIMEOUT_S, BadRequest, ControlError, NoSlot, Refused, Request, parse_request
from capsd.socketpath import control_socket, fallback_runtime_dir, in_use, path_problem
from capsd.supervisor.slot import Slot

log = structlog.get_logger("capsd.control")
MAX_REQUEST_BYTES = 64 * 1024  # one request line; capsctl's are under 100 bytes
IDLE_TIMEOUT_S = 10.0  # a connection without a whole request line by then is answered and closed


class Controlled(Protocol):
    """What the control socket asks of the daemon."""

    state: str
    count: int
    slots: Sequence[Slot]
    changing: asyncio.Lock
    pool_changing: bool

    def status(self) -> dict[str, Any]: ...

    async def scale(self, count: int, timeout: float = DRAIN_TIMEOUT_S) -> dict[str, Any]: ...

    async def restart(self, slot: Slot, force: bool = False, timeout: float | None = None) -> dict[str, Any]: ...

    async def rolling_restart(self, force: bool = False, timeout: float | None = None) -> list[dict[str, Any]]: ...


def _error(message: str, refused: Refused = BadRequest.refused) -> dict[str, Any]:
    return {"ok": False, "error": message, "refused": refused}


def _identity(path: Path) -> tuple[int, int, int] | None:
    """What tells one socket file from another: a file system reuses a freed inode number at
    once, so a socket bound after ours was unlinked may get its number; not its change time."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


class ControlServer:
    def __init__(self, configured: str, daemon: Controlled) -> None:
        self.path = control_socket(configured)
        self.daemon = daemon
        self.server: asyncio.AbstractServer | None = None
        self.bound: tuple[int, int, int] | None = None  # _identity of the socket capsd bound

    async def start(self) -> None:
        """Bind the socket; OSError if the path is not capsd's to take (checked again: it may have changed)."""
        private = fallback_runtime_dir()
        if private in self.path.parents:
            with contextlib.suppress(FileExistsError):
                private.mkdir(mode=0o700)
        stale = _identity(self.path)
        problem = path_problem(self.path) or in_use(self.path)
        if problem:
            raise OSError(problem)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if stale and _identity(self.path) == stale:
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))  # EADDRINUSE if anything appeared at the path since the checks
            os.chmod(self.path, 0o660)
        except OSError as e:
            sock.close()
            raise OSError(f"cannot bind the control socket {self.path}: {e.strerror}") from None
        self.bound = _identity(self.path)
        self.server = await asyncio.start_unix_server(self.serve, sock=sock, limit=MAX_REQUEST_BYTES)
        log.info("control socket", path=str(self.path))

    def stop(self) -> None:
        if self.server:
            self.server.close()
        if self.bound and _identity(self.path) == self.bound:  # never another instance's socket
            self.path.unlink()
        self.bound = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            reply = await self.answer(reader)
            if reply is not None:
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except OSError:
            pass  # the client went away
        finally:
            writer.close()

    async def answer(self, reader: asyncio.StreamReader) -> dict[str, Any] | None:
        try:
            line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT_S)
        except asyncio.TimeoutError:
            return _error(f"bad request: no request line within {IDLE_TIMEOUT_S:g} s")
        except ValueError:  # the line outgrew the reader's limit
            return _error(f"bad request: longer than {MAX_REQUEST_BYTES >> 10} KiB")
        if not line:
            return None  # connected and closed: someone checking that capsd listens
        try:
            return {"ok": True, **await self.dispatch(parse_request(line))}
        except ControlError as e:
            return _error(str(e), e.refused)

    async def dispatch(self, request: Request) -> dict[str, Any]:
        daemon = self.daemon
        if request.cmd == "status":
            return daemon.status()
        if daemon.state != "ready":
            raise ControlError(f"capsd is {daemon.state}: only status is answered")
        if daemon.pool_changing:
            raise ControlError("another change of the pool is under way; try again when it has ended")
        if request.cmd == "scale":  # the pool's wanted count: the daemon's reconcile reaches it
            return await daemon.scale(request.count, request.timeout or DRAIN_TIMEOUT_S)
        async with daemon.changing:
            if request.slot is None:
                return {"restarted": await daemon.rolling_restart(request.force, request.timeout)}
            if not 0 <= request.slot < daemon.count:
                raise NoSlot(f"no slot {request.slot}: slots are 0..{daemon.count - 1}")
            return await daemon.restart(daemon.slots[request.slot], request.force, request.timeout)
