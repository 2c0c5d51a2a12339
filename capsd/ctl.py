"""capsctl: status, scale and restart-worker over the control socket, transcribe over the WebSocket."""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
import uuid
import wave
from pathlib import Path
from typing import Any

import numpy as np

from capsd.cli import Parser
from capsd.control_protocol import DRAIN_TIMEOUT_S, Refused
from capsd.protocol import RATE, file_frames
from capsd.socketpath import SYSTEM_SOCKET, control_socket

EX_FAILED = 1  # the transcription got an error frame, or capsd could not do what was asked
EX_PLAN_REFUSED = os.EX_TEMPFAIL  # 75: scale refused by the memory plan; nothing changed, retry when memory is free
# What capsd refused, as capsctl's exit code; anything else capsd could not do is EX_FAILED.
EXIT_CODES = {Refused.BAD_REQUEST: os.EX_USAGE, Refused.NO_SLOT: os.EX_DATAERR, Refused.MEMORY_PLAN: EX_PLAN_REFUSED}
DEFAULT_URL = "ws://127.0.0.1:6016"
STATUS_TIMEOUT_S, TRANSCRIBE_TIMEOUT_S = 10.0, 300.0  # without --timeout
MAX_TIMEOUT_S = 86400  # a day; a socket timeout must fit in a C timeval


class CtlError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def request(path: Path, payload: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """One request, one reply. `timeout` None: capsd bounds the reply itself (every drain has a
    deadline, every worker load_timeout_s), so capsctl waits for it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout or STATUS_TIMEOUT_S)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise CtlError(f"capsd is not running: no control socket at {path}", os.EX_UNAVAILABLE) from None
        except PermissionError:
            raise CtlError(f"permission denied on {path}: run as root or a member of its group", os.EX_NOPERM) from None
        except ConnectionRefusedError:
            raise CtlError(f"capsd is not running: nothing listens on {path}", os.EX_UNAVAILABLE) from None
        except OSError as e:
            raise CtlError(f"cannot connect to {path}: {e.strerror or e}", os.EX_UNAVAILABLE) from None
        data = b""
        sock.settimeout(timeout)
        try:
            sock.sendall(json.dumps(payload).encode() + b"\n")
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise CtlError("capsd closed the control connection without a reply", os.EX_UNAVAILABLE)
                data += chunk
        except TimeoutError:
            raise CtlError(f"capsd did not answer on {path} within {timeout:g} s", os.EX_UNAVAILABLE) from None
        except OSError as e:
            raise CtlError(f"the control connection to {path} failed: {e.strerror or e}", os.EX_UNAVAILABLE) from None
    return json.loads(data)


def default_socket() -> Path:
    """capsd's own default; for an operator in the service's group, the system service's socket."""
    path = control_socket("")
    return path if path.exists() or not SYSTEM_SOCKET.exists() else SYSTEM_SOCKET


CLEAR_SCREEN = "\033[H\033[2J"  # cursor home, clear: status --watch redraws in place, like top

# The per-slot figures that also make the totals row.
COUNTED = ("rss_bytes", "private_bytes", "queue_depth", "tasks_in_progress", "tasks_done", "tasks_failed", "restarts", "segments_decoded")


def status_table(status: dict[str, Any]) -> str:
    mib = 2**20
    row = "{:>5} {:>7} {:<10} {:>7} {:>7} {:>5} {:>5} {:>6} {:>6} {:>8} {:>8} {:>5} {:>5}  {:<20} {}"

    def counted(figures: dict[str, int]) -> list[int]:
        return [figures["rss_bytes"] // mib, figures["private_bytes"] // mib, *(figures[key] for key in COUNTED[2:])]

    lines = [
        f"capsd {status['version']} pid {status['pid']} {status['state']}, up {status['uptime_s']:.0f} s, "
        f"{status['connections']} connections, audio recognised {status['audio_per_second']:.1f} s per second, "
        f"memory planned {status['memory']['planned_bytes'] // mib} MiB of {status['memory']['available_bytes'] // mib} MiB",
        row.format("SLOT", "PID", "STATE", "RSS_MB", "OWN_MB", "QUEUE", "TASKS", "DONE", "FAILED", "RESTARTS", "SEGMENTS",
                   "BUSY", "CPU", "MODEL", "LAST_EXIT"),
    ]
    for s in status["slots"]:
        last = s["last_exit"]
        last_text = f"{last['reason']} ({last['exitcode']}) at {last['at']}" if last else "-"
        shares = f"{s['busy_share']:.0%}", f"{s['cpu_share']:.0%}"
        model = f"{s['model']['type']} {Path(s['model']['dir']).name}"
        lines.append(row.format(s["slot"], s["pid"] or "-", s["state"], *counted(s), *shares, model, last_text))
    total = {key: sum(s[key] for s in status["slots"]) for key in COUNTED}
    lines.append(row.format("total", "", "", *counted(total), "", "", "", ""))
    lines += [f"loader pid {loader['pid']} {loader['state']}, RSS {loader['rss_bytes'] // mib} MiB, own "
              f"{loader['private_bytes'] // mib} MiB, model {loader['model']['type']} {Path(loader['model']['dir']).name}"
              for loader in status["loaders"]]  # fmt: skip
    return "\n".join(lines)


def read_wav(path: Path) -> np.ndarray:
    """16 kHz mono float32 samples of a PCM WAV file, resampled and mixed down if need be."""
    try:
        with wave.open(str(path), "rb") as w:
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except PermissionError:
        raise CtlError(f"permission denied on {path}", os.EX_NOPERM) from None
    except (OSError, EOFError, wave.Error) as e:
        raise CtlError(f"cannot read {path} as PCM WAV: {e}", os.EX_DATAERR) from None
    if width == 1:
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width in (2, 4):
        kind = np.int16 if width == 2 else np.int32
        samples = np.frombuffer(raw, kind).astype(np.float32) / np.iinfo(kind).max
    else:
        raise CtlError(f"{path}: {8 * width}-bit samples are not supported (use 8, 16 or 32-bit PCM)", os.EX_DATAERR)
    samples = samples.reshape(-1, channels).mean(axis=1)
    if rate != RATE:
        n = round(len(samples) * RATE / rate)
        samples = np.interp(np.arange(n) * rate / RATE, np.arange(len(samples)), samples)
    return samples.astype(np.float32)


def transcribe(url: str, path: Path, timeout: float) -> tuple[int, str]:
    """Send the file as CapsWriter's file client does; return (exit code, what to print)."""
    from websockets.exceptions import WebSocketException
    from websockets.sync.client import connect

    task_id = str(uuid.uuid4())
    frames = file_frames(task_id, read_wav(path))
    try:
        with connect(url, max_size=None, open_timeout=timeout) as ws:
            for message in frames:
                ws.send(message)
            while True:
                result = json.loads(ws.recv(timeout=timeout))
                if result.get("task_id") in (task_id, None) and result["is_final"]:
                    break
    except (OSError, TimeoutError, WebSocketException) as e:
        raise CtlError(f"cannot transcribe through {url}: {e}", os.EX_UNAVAILABLE) from None
    if "error" in result:
        return EX_FAILED, f"{result['error']['code']}: {result['error']['message']}"
    return os.EX_OK, result["text"]


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_TIMEOUT_S:  # NaN too
        raise argparse.ArgumentTypeError(f"{text!r}: allowed is a positive number of seconds, at most {MAX_TIMEOUT_S}")
    return value


def global_options(parser: argparse.ArgumentParser) -> None:
    """Options every subcommand takes, before or after its name (the last one given wins)."""
    # SUPPRESS: a subcommand not given an option leaves alone the one given before its name.
    timeout_help = (
        f"how long to wait for capsd (default: status {STATUS_TIMEOUT_S:g} s, transcribe {TRANSCRIBE_TIMEOUT_S:g} s);"
        f" restart-worker and scale: how long a drain may take before it is forced (default {DRAIN_TIMEOUT_S:g} s)"
    )
    parser.add_argument(
        "--socket", metavar="PATH", default=argparse.SUPPRESS, help="control socket (default: as capsd resolves it)"
    )
    parser.add_argument(
        "--url", default=argparse.SUPPRESS, help=f"capsd's WebSocket, for transcribe (default: {DEFAULT_URL})"
    )
    parser.add_argument("--timeout", metavar="S", type=seconds, default=argparse.SUPPRESS, help=timeout_help)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(prog="capsctl", description="Control a running capsd.")
    global_options(parser)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    status = commands.add_parser("status", help="one row per slot, plus daemon totals")
    status.add_argument("--json", action="store_true", help="the status as JSON")
    status.add_argument("--watch", metavar="S", nargs="?", type=float, const=2.0,
                        help="refresh every S seconds (default 2) like top, until Ctrl-C")  # fmt: skip
    restart = commands.add_parser("restart-worker", help="restart slot N, or all one at a time (graceful unless --force)")
    restart.add_argument("slot", metavar="N|all", type=slot_number)
    restart.add_argument("--force", action="store_true", help="kill at once; its tasks fail with worker_restarted")
    scale = commands.add_parser(
        "scale", help=f"change the number of slots (memory plan checked first; refused: exit {EX_PLAN_REFUSED})"
    )
    scale.add_argument("count", metavar="N", type=slot_count, help="the new number of slots, at least 1")
    file = commands.add_parser("transcribe", help="send a WAV file as CapsWriter does; print the text")
    file.add_argument("file", metavar="FILE.wav", type=Path)
    for command in (status, restart, scale, file):
        global_options(command)
    return parser.parse_args(argv, argparse.Namespace(socket=None, url=DEFAULT_URL, timeout=None))


def slot_number(text: str) -> int | str:
    """restart-worker's argument: a slot number, or "all"."""
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a slot number or 'all'") from None


def slot_count(text: str) -> int:
    """scale's argument: a number of slots, at least 1."""
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed is a number of slots, at least 1")
    return count


def show_status(path: Path, args: argparse.Namespace) -> str:
    reply = request(path, {"cmd": "status"}, args.timeout or STATUS_TIMEOUT_S)
    reply.pop("ok")
    return json.dumps(reply, indent=2) if args.json else status_table(reply)


def watched_status(path: Path, args: argparse.Namespace) -> str:
    """status --watch outlives capsd: while it is gone (restarting, say), one line says so."""
    try:
        return show_status(path, args)
    except CtlError as e:
        if e.code != os.EX_UNAVAILABLE:
            raise
        return f"{time.strftime('%Y-%m-%d %H:%M:%S')} {e}"


def run(args: argparse.Namespace) -> int:
    if args.command == "transcribe":
        code, text = transcribe(args.url, args.file, args.timeout or TRANSCRIBE_TIMEOUT_S)
        print(text, file=sys.stdout if code == os.EX_OK else sys.stderr)
        return code
    path = Path(args.socket) if args.socket else default_socket()
    if args.command == "status":
        if args.watch is None:
            print(show_status(path, args))
            return os.EX_OK
        try:
            while True:
                print(CLEAR_SCREEN + watched_status(path, args), flush=True)
                time.sleep(args.watch)
        except KeyboardInterrupt:  # Ctrl-C ends --watch, as it ends top
            return os.EX_OK
    if args.command == "scale":
        payload = {"cmd": "scale", "count": args.count, "timeout": args.timeout}
        reply = request(path, payload, None)
        check(reply)
        print(f"{reply['before']} -> {reply['count']} slots; {reply['plan']}")
        return os.EX_OK
    payload = {"cmd": "restart-worker", "slot": args.slot, "force": args.force, "timeout": args.timeout}
    reply = request(path, payload, None)
    check(reply)
    for restarted in reply.get("restarted", [reply]):
        print(f"slot {restarted['slot']}: old pid {restarted['old_pid']}, new pid {restarted['new_pid']}")
    return os.EX_OK


def check(reply: dict[str, Any]) -> None:
    """A refusal as capsctl's exit code: a bad slot number, the memory plan, anything else."""
    if reply["ok"]:
        return
    raise CtlError(reply["error"], EXIT_CODES.get(reply.get("refused"), EX_FAILED))


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse_args(argv))
    except CtlError as e:
        print(f"capsctl: {e}", file=sys.stderr)
        return e.code
    except PermissionError as e:  # wherever it happens, as when looking for the default socket
        where = f" on {e.filename}" if e.filename else ""
        print(f"capsctl: permission denied{where}: run as root or a member of its group", file=sys.stderr)
        return os.EX_NOPERM


if __name__ == "__main__":
    sys.exit(main())
