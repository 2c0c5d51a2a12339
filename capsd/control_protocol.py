"""The control socket's protocol, sans I/O: one JSON request line in, one JSON reply line out.

What capsd and capsctl agree on: the commands and their arguments, the request's checks, and the
kinds of refusal (a reply's `refused`), which capsctl maps to its exit codes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

DRAIN_TIMEOUT_S = 30.0  # a graceful recycle waits this long for the job in its worker, then forces
COMMANDS = {"status": set(), "restart-worker": {"slot", "force", "timeout"}, "scale": {"count", "timeout"}}


MAX_COUNT = 1_000_000  # slots a scale may ask for: the memory plan refuses far fewer; this keeps its sums finite


class Refused(str, Enum):
    """A reply's `refused`: the kind of refusal, which capsctl maps to its exit code."""

    FAILED = "failed"  # capsd could not do it
    BAD_REQUEST = "bad request"
    NO_SLOT = "no slot"
    MEMORY_PLAN = "memory plan"

    def __str__(self) -> str:
        return self.value


class ControlError(Exception):
    """capsd could not do what was asked; `refused` is the kind."""

    refused = Refused.FAILED


class BadRequest(ControlError):
    refused = Refused.BAD_REQUEST


class NoSlot(ControlError):
    refused = Refused.NO_SLOT


class PlanRefused(ControlError):
    refused = Refused.MEMORY_PLAN


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
