"""Clients that speak to capsd as CapsWriter-Offline's do, for tests and benchmarks.

The file client sends 60 s frames, `is_final` on the last one (which still carries audio); the
mic client sends small frames and ends with an empty final frame (docs/design.md#how-clients-end-a-task).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any

import numpy as np
import websockets

from capsd.protocol import FILE_FRAME_S, FILE_SEG, RATE, file_frames
from capsd.protocol import client_frame as frame


def connect(url: str, **options: Any) -> Any:
    """A client connection as CapsWriter's: no frame size limit, and no keepalive pings, so a
    test client never gives up on its own before capsd has acted."""
    return websockets.connect(url, max_size=None, ping_interval=None, **options)


async def send_file(
    ws: Any, task_id: str, samples: np.ndarray, frame_s: float = FILE_FRAME_S, seg: tuple[float, float] = FILE_SEG
) -> None:
    for message in file_frames(task_id, samples, frame_s, seg):
        await ws.send(message)


async def send_mic(
    ws: Any,
    task_id: str,
    samples: np.ndarray,
    frame_s: float = 0.1,
    seg: tuple[float, float] = (15, 2),
    pace: float = 0.0,
) -> None:
    """`pace` seconds between frames (0 = as fast as possible; frame_s = real time)."""
    step = round(frame_s * RATE)
    for start in range(0, len(samples), step):
        await ws.send(frame(task_id, samples[start : start + step], False, "mic", seg))
        if pace:
            await asyncio.sleep(pace)
    await ws.send(frame(task_id, samples[:0], True, "mic", seg))


async def stream_endless(
    ws: Any,
    task_id: str,
    samples: np.ndarray,
    until: float,
    sent: list[tuple[float, float]],
    frame_s: float = 10.0,
    seg: tuple[float, float] = (1, 0.5),
) -> None:
    """A task that never ends: `samples` again and again in never-final file frames of `frame_s`,
    as fast as capsd reads them (a send waits while it does not), until time.monotonic() reaches
    `until`; after each frame, (time.monotonic(), audio seconds sent so far) is appended to `sent`."""
    step = round(frame_s * RATE)
    frames = [(frame(task_id, samples[i : i + step], False, "file", seg), len(samples[i : i + step]) / RATE)
              for i in range(0, len(samples), step)]  # fmt: skip
    audio = 0.0
    for message, seconds in itertools.cycle(frames):
        if (left := until - time.monotonic()) <= 0:
            return
        try:
            await asyncio.wait_for(ws.send(message), left)
        except asyncio.TimeoutError:  # held back by capsd when the time was up
            return
        audio += seconds
        sent.append((time.monotonic(), audio))


async def receive(ws: Any, task_ids: set[str], timeout: float = 120) -> dict[str, list[dict[str, Any]]]:
    """Every frame per task until each of `task_ids` has its final frame."""
    frames: dict[str, list[dict[str, Any]]] = {t: [] for t in task_ids}
    pending = set(task_ids)

    async def collect() -> None:
        while pending:
            message = json.loads(await ws.recv())
            frames.setdefault(message["task_id"], []).append(message)
            if message["is_final"]:
                pending.discard(message["task_id"])

    await asyncio.wait_for(collect(), timeout)
    return frames
