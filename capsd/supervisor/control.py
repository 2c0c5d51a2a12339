"""The control socket: one JSON request line in, one JSON reply line out.

Mode 0660: root and the service's group may control capsd; anyone else cannot connect.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from capsd.config import control_socket

if TYPE_CHECKING:
    from capsd.supervisor.daemon import Daemon

log = structlog.get_logger("capsd.control")
RESTART_TIMEOUT_S = 30.0  # default graceful drain before restart-worker forces the restart
READY_TIMEOUT_S = 120.0


class ControlError(Exception):
    pass


class ControlServer:
    def __init__(self, configured: str, daemon: Daemon) -> None:
        self.path = control_socket(configured)
        self.daemon = daemon
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            if _listening(self.path):
                raise OSError(f"another capsd is listening on {self.path}")
            self.path.unlink()
        self.server = await asyncio.start_unix_server(self.serve, path=str(self.path))
        os.chmod(self.path, 0o660)
        log.info("control socket", path=str(self.path))

    def stop(self) -> None:
        if self.server:
            self.server.close()
            self.path.unlink(missing_ok=True)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = json.loads(await reader.readline())
            reply: dict[str, Any] = {"ok": True, **await self.dispatch(request)}
        except ControlError as e:
            reply = {"ok": False, "error": str(e)}
        except (ValueError, TypeError, KeyError) as e:
            reply = {"ok": False, "error": f"bad request: {e}"}
        writer.write(json.dumps(reply).encode() + b"\n")
        try:
            await writer.drain()
        finally:
            writer.close()

    async def dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request["cmd"]
        if cmd == "status":
            return self.daemon.status()
        if cmd == "restart-worker":
            return await self.restart_worker(int(request["slot"]), bool(request.get("force")), request.get("timeout"))
        raise ControlError(f"unknown command {cmd!r}")

    async def restart_worker(self, index: int, force: bool, timeout: float | None) -> dict[str, Any]:
        slots = self.daemon.slots
        if not 0 <= index < len(slots):
            raise ControlError(f"no slot {index}: slots are 0..{len(slots) - 1}")
        slot = slots[index]
        old = slot.incarnation
        if old is None or not old.ready:
            raise ControlError(f"slot {index} is {slot.state}; try again when it is ready")
        log.info("restart requested", slot=index, pid=old.pid, force=force)
        if force:
            slot.kill("requested")
        else:
            slot.drain("requested")
            if not await _until(lambda: slot.incarnation is not old, timeout or RESTART_TIMEOUT_S):
                log.warning("drain timed out", slot=index, pid=old.pid)
                slot.kill("requested")
        if not await _until(lambda: slot.incarnation is not old and slot.incarnation.ready, READY_TIMEOUT_S):
            raise ControlError(f"slot {index}: the new worker is not ready after {READY_TIMEOUT_S:g} s")
        return {"slot": index, "old_pid": old.pid, "new_pid": slot.incarnation.pid}


async def _until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True
