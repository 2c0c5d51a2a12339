"""The control socket: one JSON request line in, one JSON reply line out.

Mode 0660: root and the service's group may control capsd; anyone else cannot connect.
capsd takes its socket path only when nothing is there or a stale socket is (one nobody listens
on), and at stop removes the path only while it is still the socket capsd bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from capsd.config import control_socket, fallback_runtime_dir
from capsd.supervisor.slot import DRAIN_TIMEOUT_S

if TYPE_CHECKING:
    from capsd.supervisor.daemon import Daemon

log = structlog.get_logger("capsd.control")
MAX_REQUEST_BYTES = 64 * 1024  # one request line; capsctl's are under 100 bytes
IDLE_TIMEOUT_S = 10.0  # a connection without a whole request line by then is answered and closed
UNIX_PATH_MAX = 107  # sockaddr_un.sun_path: 108 bytes with the terminating NUL
COMMANDS = {"status": set(), "restart-worker": {"slot", "force", "timeout"}, "scale": {"count", "timeout"}}


MAX_COUNT = 1_000_000  # slots a scale may ask for: the memory plan refuses far fewer; this keeps its sums finite


class ControlError(Exception):
    """capsd could not do what was asked; `refused` is the kind, which capsctl maps to its exit code."""

    refused = "failed"


class BadRequest(ControlError):
    refused = "bad request"


class NoSlot(ControlError):
    refused = "no slot"


class PlanRefused(ControlError):
    refused = "memory plan"


@dataclass(frozen=True)
class Request:
    cmd: str
    slot: int | None = 0  # None: every slot, one after another (a rolling restart)
    force: bool = False
    timeout: float | None = None  # the drain limit; None: slot.DRAIN_TIMEOUT_S
    count: int = 0  # scale: the new number of slots


def parse_request(line: bytes) -> Request:
    """The whole request, checked before anything is done; ControlError says what is wrong."""
    try:
        request = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
        raise BadRequest("bad request: not a line of JSON") from None
    if not isinstance(request, dict):
        raise BadRequest("bad request: not a JSON object")
    cmd = request.get("cmd")
    if not isinstance(cmd, str) or cmd not in COMMANDS:
        raise BadRequest(f"bad request: cmd = {_show(cmd)}: allowed is one of {', '.join(map(repr, COMMANDS))}")
    unknown = sorted(set(request) - COMMANDS[cmd] - {"cmd"})
    if unknown:
        raise BadRequest(f"bad request: {cmd} takes no {', '.join(map(_show, unknown))}")
    if cmd == "status":
        return Request(cmd)
    timeout = request.get("timeout")
    seconds = None if timeout is None else _seconds(timeout)
    if timeout is not None and seconds is None:
        raise BadRequest(f"bad request: timeout = {_show(timeout)}: allowed is null or a positive number of seconds")
    if cmd == "scale":
        count = request.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_COUNT:
            raise BadRequest(f"bad request: count = {_show(count)}: allowed is a number of slots, 1..{MAX_COUNT}")
        return Request(cmd, timeout=seconds, count=count)
    slot, force = request.get("slot"), request.get("force", False)
    if slot == "all":
        slot = None
    elif not isinstance(slot, int) or isinstance(slot, bool):
        raise BadRequest(f"bad request: slot = {_show(slot)}: allowed is a slot number (an integer) or \"all\"")
    if not isinstance(force, bool):
        raise BadRequest(f"bad request: force = {_show(force)}: allowed is true or false")
    return Request(cmd, slot, force, seconds)


def _seconds(value: Any) -> float | None:
    """`value` as a positive, finite number of seconds, else None."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except OverflowError:  # an integer beyond any float
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _error(message: str, refused: str = BadRequest.refused) -> dict[str, Any]:
    return {"ok": False, "error": message, "refused": refused}


# -- the socket's path ------------------------------------------------------------------------


def path_problem(path: Path) -> str | None:
    """Why capsd may not take `path` for its control socket; None when nothing or a socket is there."""
    size = len(os.fsencode(path))
    if size > UNIX_PATH_MAX:
        return f"{path} is {size} bytes long; a unix socket path has at most {UNIX_PATH_MAX}"
    private = fallback_runtime_dir()
    if private in path.parents and (problem := private_dir_problem(private)):
        return problem
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"cannot look at {path}: {e.strerror}"
    if not stat.S_ISSOCK(mode):
        return f"{path} exists and is not a socket; capsd replaces nothing but a stale socket"
    return None


def private_dir_problem(directory: Path) -> str | None:
    """Anyone may create a directory in /tmp first: capsd uses it only if it is its user's alone."""
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"cannot look at {directory}: {e.strerror}"
    uid = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        why = "is not a directory"
    elif st.st_uid != uid:
        why = f"is owned by uid {st.st_uid}"
    elif st.st_mode & 0o077:
        why = f"has mode {stat.S_IMODE(st.st_mode):04o}"
    else:
        return None
    return (
        f"{directory} {why}; it must be a directory of mode 0700 owned by capsd's user (uid {uid}): "
        "remove it, or set $XDG_RUNTIME_DIR or [control] socket"
    )


def in_use(path: Path) -> str | None:
    """Why the socket at `path` is not stale (someone listens on it, or capsd cannot tell); None if stale."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(5)  # a listener with a full backlog makes connect wait
        try:
            probe.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except OSError as e:
            return f"cannot tell whether {path} is in use: {e.strerror or e}"
    return f"another process is listening on {path}"


def _identity(path: Path) -> tuple[int, int, int] | None:
    """What tells one socket file from another: a file system reuses a freed inode number at
    once, so a socket bound after ours was unlinked may get its number; not its change time."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


class ControlServer:
    def __init__(self, configured: str, daemon: Daemon) -> None:
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
        if daemon.changing.locked():
            raise ControlError("another change of the pool is under way; try again when it has ended")
        async with daemon.changing:
            if request.cmd == "scale":
                return await daemon.scale(request.count, request.timeout or DRAIN_TIMEOUT_S)
            if request.slot is None:
                return {"restarted": await daemon.rolling_restart(request.force, request.timeout)}
            if not 0 <= request.slot < daemon.count:
                raise NoSlot(f"no slot {request.slot}: slots are 0..{daemon.count - 1}")
            return await daemon.restart(daemon.slots[request.slot], request.force, request.timeout)
