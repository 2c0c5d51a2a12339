"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET, a no-op outside systemd."""

from __future__ import annotations

import os
import socket


def notify(**fields: str | int) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError:
            pass


def watchdog_interval() -> float | None:
    """Half of WatchdogSec=, as sd_watchdog_enabled(3) advises; None when no watchdog is set."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6
