"""`[api] keys_file`: the bearer keys the API takes, and when a listener may have none.

A key file has one key per line; blank lines and lines starting with # are skipped, spaces around a
key dropped. It is read at start (a file that cannot be read is exit 78 naming the key) and again
at each SIGHUP. Keys never appear in a log line: only how many there are.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path

from capsd.config import ApiConfig, ConfigError

_BEARER = re.compile(r"Bearer +(\S+) *", re.IGNORECASE)


def parse_keys(text: str) -> frozenset[str]:
    return frozenset(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))


def bearer(header: str | None) -> str | None:
    """The key of an `Authorization: Bearer KEY` header, or None."""
    match = _BEARER.fullmatch(header or "")
    return match[1] if match else None


def loopback_only(addr: str) -> bool:
    """Whether every address `addr` resolves to (as the listener will) is a loopback one."""
    try:
        found = socket.getaddrinfo(addr, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, ValueError):
        return False
    return bool(found) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in found)


def read_keys(cfg: ApiConfig) -> frozenset[str]:
    """The keys of `[api] keys_file` (none when it is ""); ConfigError naming the key otherwise."""
    if not cfg.keys_file:
        return frozenset()
    try:
        text = Path(cfg.keys_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise ConfigError(f"config: [api] keys_file = {cfg.keys_file!r} is refused: cannot read it ({reason})") from None
    return parse_keys(text)


def check_keys(cfg: ApiConfig, addr: str, keys: frozenset[str]) -> None:
    """A listener off loopback needs keys, unless allow_anonymous says so: ConfigError otherwise."""
    if cfg.port and not keys and not cfg.allow_anonymous and not loopback_only(addr):
        raise ConfigError(
            f"config: [api] keys_file = {cfg.keys_file!r} is refused: the API listens on {addr!r}, not only on"
            " loopback, and has no key; give a keys_file with a key, or set [api] allow_anonymous = true"
        )
