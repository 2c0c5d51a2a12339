"""structlog set up for operators: one event per line, to the console, as JSON, or to journald.

Under systemd (`format = "auto"` and $JOURNAL_STREAM set) each event goes to the journal over
its native socket with PRIORITY and the fields CAPSD_SLOT, CAPSD_PID and CAPSD_TASK, so
`journalctl -u capsd CAPSD_SLOT=1` shows slot 1's history.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from typing import Any

import structlog

JOURNAL_SOCKET = "/run/systemd/journal/socket"
PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}
FIELDS = {"slot": "CAPSD_SLOT", "pid": "CAPSD_PID", "task": "CAPSD_TASK"}


class JournalRenderer:
    """Sends each event to journald (native protocol) and returns nothing to print."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.path = path

    def __call__(self, _logger: Any, method: str, event: dict[str, Any]) -> str:
        level = event.pop("level", method)
        event.pop("timestamp", None)
        message = event.pop("event", "")
        fields = {"PRIORITY": str(PRIORITY.get(level, 6)), "SYSLOG_IDENTIFIER": "capsd"}
        for key, name in FIELDS.items():
            if key in event:
                fields[name] = str(event[key])
        rest = " ".join(f"{k}={v}" for k, v in event.items())
        fields["MESSAGE"] = f"{message} {rest}".strip()
        payload = b"".join(_journal_field(k, v) for k, v in fields.items())
        try:
            self.sock.sendto(payload, self.path)
        except OSError:  # journald away or message too big: the console still gets it
            return fields["MESSAGE"]
        raise structlog.DropEvent


def _journal_field(key: str, value: str) -> bytes:
    data = value.encode("utf-8", "replace")
    if b"\n" in data:
        return key.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
    return key.encode() + b"=" + data + b"\n"


def setup(level: str = "info", fmt: str = "auto") -> None:
    if fmt == "auto":
        fmt = "journald" if os.environ.get("JOURNAL_STREAM") and os.path.exists(JOURNAL_SOCKET) else "console"
    renderer: Any
    if fmt == "journald":
        renderer = JournalRenderer()
    elif fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=lambda obj, **kw: json.dumps(obj, ensure_ascii=False))
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,  # a worker's slot and pid on each of its lines
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=False),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
