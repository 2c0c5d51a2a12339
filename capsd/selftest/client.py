"""Clients that speak to capsd as CapsWriter-Offline's do, for tests and benchmarks.

The file client sends 60 s frames, `is_final` on the last one (which still carries audio); the
mic client sends small frames and ends with an empty final frame (docs/design.md#how-clients-end-a-task).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import numpy as np
import websockets

from capsd.protocol import RATE

FILE_FRAME_S = 60.0  # CapsWriter's file client sends 60 s per frame ...
FILE_SEG = (25.0, 2.0)  # ... with file_seg_duration = 25, file_seg_overlap = 2


def connect(url: str, **options: Any) -> Any:
    """A client connection as CapsWriter's: no frame size limit, and no keepalive pings, so a
    test client never gives up on its own before capsd has acted."""
    return websockets.connect(url, max_size=None, ping_interval=None, **options)


def frame(task_id: str, samples: np.ndarray, is_final: bool, source: str, seg: tuple[float, float]) -> str:
    return json.dumps(
        {
            "task_id": task_id,
            "source": source,
            "data": base64.b64encode(np.asarray(samples, dtype=np.float32).tobytes()).decode(),
            "is_final": is_final,
            "time_start": time.time(),
            "seg_duration": seg[0],
            "seg_overlap": seg[1],
            "context": "",
            "language": "auto",
        }
    )


def file_frames(
    task_id: str, samples: np.ndarray, frame_s: float = FILE_FRAME_S, seg: tuple[float, float] = FILE_SEG
) -> list[str]:
    """The frames CapsWriter's file client sends for `samples`: `is_final` on the last, with audio."""
    step = round(frame_s * RATE)
    starts = list(range(0, len(samples), step)) or [0]
    return [frame(task_id, samples[start : start + step], start == starts[-1], "file", seg) for start in starts]


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
