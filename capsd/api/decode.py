"""Decode one uploaded media file to 16 kHz mono float32, in a process of its own.

`python -m capsd.api.decode IN OUT MAX_SECONDS SUPERVISOR_PID`: the audio of IN's first audio stream, resampled
by FFmpeg (PyAV), is written to OUT as raw little-endian float32 samples, frame by frame, so this
process holds a few frames whatever the file's length. Exit 0 and one JSON line on stdout
(`{"seconds": ...}`); exit 1 and one line on stderr saying why the file cannot be decoded, or
that its audio is longer than MAX_SECONDS. The supervisor runs it with a timeout and kills it at
will: a file that crashes or hangs FFmpeg costs this process only
(docs/design.md#uploads-are-decoded-in-a-process-of-their-own).
"""

from __future__ import annotations

import json
import resource
import sys

from capsd import lifeline

RATE = 16000  # capsd.protocol.RATE, not imported: this process loads only what decoding needs
# This process's own ceilings: the address space and CPU seconds a hostile file can take
# (the supervisor's timeout is the bound that always holds; setrlimit may be refused).
ADDRESS_SPACE_BYTES = 2 * 2**30
CPU_SECONDS = 600


class Refused(Exception):
    """The file cannot be decoded, or is too long: the request's 400."""


def limit_self() -> None:
    for which, value in ((resource.RLIMIT_AS, ADDRESS_SPACE_BYTES), (resource.RLIMIT_CPU, CPU_SECONDS)):
        try:
            resource.setrlimit(which, (value, value))
        except (OSError, ValueError):  # systemd's SystemCallFilter=~@resources: the timeout still holds
            pass


def decode(source: str, target: str, max_seconds: float) -> float:
    """Seconds of audio written to `target`."""
    import av  # after the limits: FFmpeg's libraries load under them

    written = 0
    limit = round(max_seconds * RATE)
    try:
        with av.open(source, metadata_errors="ignore") as container, open(target, "wb") as out:
            if not container.streams.audio:
                raise Refused("the file has no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=RATE)
            for frame in container.decode(stream):
                for piece in resampler.resample(frame):
                    written += _write(out, piece, written, limit)
            for piece in resampler.resample(None):
                written += _write(out, piece, written, limit)
    except av.FFmpegError as e:
        raise Refused(f"the file cannot be decoded: {e.strerror or type(e).__name__}") from None
    return written / RATE


def _write(out: object, piece: object, written: int, limit: int) -> int:
    samples = piece.to_ndarray().reshape(-1)  # type: ignore[attr-defined]
    if written + len(samples) > limit:
        raise Refused(f"the audio is longer than {limit / RATE / 3600:g} h, the longest capsd takes")
    out.write(samples.astype("<f4", copy=False).tobytes())  # type: ignore[attr-defined]
    return len(samples)


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: python -m capsd.api.decode IN OUT MAX_SECONDS SUPERVISOR_PID", file=sys.stderr)
        return 2
    lifeline.end_with(int(argv[3]))  # no decoding on for a supervisor that is gone
    limit_self()
    try:
        seconds = decode(argv[0], argv[1], float(argv[2]))
    except Refused as e:
        print(str(e)[:300], file=sys.stderr)
        return 1
    except (MemoryError, OSError, ValueError, EOFError) as e:  # a hostile file's last resort
        print(f"the file cannot be decoded: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
        return 1
    print(json.dumps({"seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
