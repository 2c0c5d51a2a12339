"""Mutated frames of every kind thrown at a live capsd: each is answered, nothing else is hurt."""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import ClientConnection, connect

from capsd.selftest.tones import synth, token_digits
from tests.support.checks import FRAME_FIELDS
from tests.support.daemon import Capsd

pytestmark = pytest.mark.integration

KEYS = ["task_id", "source", "data", "is_final", "time_start", "seg_duration", "seg_overlap", "context", "language"]
# Lone surrogates included: JSON escapes them ("\\ud800"), and they are no valid Unicode
# (docs/design.md#json-strings-that-are-not-unicode).
json_text = st.text(st.characters(exclude_categories=[]), max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | json_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=5,
)
audio = st.binary(max_size=4000).map(lambda b: base64.b64encode(b).decode())


@st.composite
def mutated_frames(draw: st.DrawFn) -> str | bytes:
    samples = np.asarray(draw(st.lists(st.floats(-1, 1, width=32), max_size=400)), dtype=np.float32)
    frame: dict[str, Any] = {
        "task_id": "fuzz",
        "source": "mic",
        "data": base64.b64encode(samples.tobytes()).decode(),
        "is_final": True,
        "time_start": 1.0,
        "seg_duration": 15,
        "seg_overlap": 2,
    }
    kind = draw(st.sampled_from(["drop", "retype", "audio", "raw", "binary", "several"]))
    if kind == "raw":
        return draw(st.text(max_size=200))
    if kind == "binary":
        return draw(st.binary(max_size=200))
    for _ in range(draw(st.integers(1, 3)) if kind == "several" else 1):
        key = draw(st.sampled_from(KEYS))
        if kind == "drop":
            frame.pop(key, None)
        elif kind == "audio":
            frame["data"] = draw(audio | st.text(max_size=50))
        else:
            frame[key] = draw(json_values)
    frame.setdefault("is_final", True) if kind != "drop" else None
    return json.dumps(frame, allow_nan=True)


@pytest.fixture(scope="module")
def capsd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Capsd]:
    daemon = Capsd(tmp_path_factory.mktemp("fuzz"), {"workers": {"count": 2}})
    yield daemon
    assert daemon.stop() == 0


@pytest.fixture(scope="module")
def ws(capsd: Capsd) -> Iterator[ClientConnection]:
    with connect(capsd.url, max_size=None, ping_interval=None) as conn:
        yield conn


ids = itertools.count()


def readable_id(raw: str | bytes) -> tuple[str | None, bool]:
    """The task id capsd can read from a frame, and whether it says is_final: true."""
    try:
        frame = json.loads(raw)
    except (ValueError, RecursionError):
        return None, False
    if not isinstance(frame, dict) or not isinstance(frame.get("task_id"), str) or not frame["task_id"]:
        return None, False
    try:
        frame["task_id"].encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: cannot be echoed
        return None, False
    return frame["task_id"], frame.get("is_final") is True


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=mutated_frames())
def test_every_frame_is_answered_and_the_daemon_stays_healthy(
    capsd: Capsd, ws: ClientConnection, raw: str | bytes
) -> None:
    task_id = f"fuzz-{next(ids)}"
    raw = raw.replace('"fuzz"', json.dumps(task_id)) if isinstance(raw, str) else raw
    ws.send(raw)
    sent_id, is_final = readable_id(raw)
    if sent_id is not None and not is_final:
        # A readable task that is not final may owe nothing yet: end it, as a client would.
        ws.send(json.dumps({"task_id": sent_id, "source": "mic", "data": "", "is_final": True, "time_start": 1}))
    reply = json.loads(ws.recv(timeout=10))
    assert FRAME_FIELDS <= reply.keys() and reply["is_final"] is True
    assert reply["task_id"] == sent_id
    if "error" in reply:
        assert reply["error"]["code"] == "bad_request" and reply["text"] == ""


def test_after_the_fuzzing_a_good_task_is_exact_and_no_worker_restarted(capsd: Capsd, ws: ClientConnection) -> None:
    samples, _ = synth("8008135")
    ws.send(json.dumps({"task_id": "good", "source": "file", "is_final": True, "time_start": 1.0,
                        "data": base64.b64encode(samples.tobytes()).decode()}))  # fmt: skip
    reply = json.loads(ws.recv(timeout=30))
    while reply["task_id"] != "good" or not reply["is_final"]:
        reply = json.loads(ws.recv(timeout=30))
    assert token_digits(reply["tokens"]) == "8008135" and reply["text"] == "8008135"
    status = capsd.status()
    assert all(s["state"] == "ready" and s["restarts"] == 0 for s in status["slots"])
