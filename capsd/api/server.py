"""The OpenAI-compatible HTTP API on `[api] port`, served by aiohttp on the supervisor's event loop
(docs/design.md#the-openai-compatible-api).

A transcription request is a file task in the pool, like a CapsWriter file client's: its upload
streams to a temporary file (bounded by `[api] max_upload_mb`), a decode process of its own turns
it into 16 kHz mono float32 on disk (docs/design.md#uploads-are-decoded-in-a-process-of-their-own),
and that audio is read into the task's segmenter in 60 s chunks with a file connection's flow
control and through the daemon-wide intake, so the supervisor never holds more of it than a
CapsWriter client could make it hold. Every bound has an answer (README, Limits).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from aiohttp import BodyPartReader, web

from capsd.api.keys import bearer, check_keys, read_keys
from capsd.api.responses import (
    TASK_ERROR_STATUS,
    ApiError,
    Deltas,
    Params,
    Transcript,
    error_body,
    event,
    parse_params,
    render,
)
from capsd.config import ApiConfig, ConfigError
from capsd.memory import API_DECODES, API_MAX_REQUESTS
from capsd.protocol import FILE_FRAME_S, FILE_SEG, RATE, ErrorCode, clip
from capsd.segment import Segmenter
from capsd.supervisor.holding import MAX_BUFFERED_AUDIO_BYTES, Holding, refusal
from capsd.supervisor.intake import Intake
from capsd.supervisor.plainhttp import Answer
from capsd.supervisor.slot import Slot
from capsd.supervisor.task import Formatting, Task

log = structlog.get_logger("capsd.api")

# Bounds (README, Limits); the plan counts API_MAX_REQUESTS and API_DECODES (capsd.memory).
MAX_AUDIO_S = 4 * 3600.0  # decoded audio of one upload: beyond it, 400 (230 MB on disk per hour)
DECODE_TIMEOUT_S = 300.0  # a decode process still running after this is killed: 400
UPLOAD_IDLE_S = 30.0  # an upload that sends nothing for this long is given up: 400
MAX_FIELD_BYTES = 64 * 2**10  # one text field
MAX_FIELDS = 64  # parts of one request besides the file
MULTIPART_SLACK_BYTES = MAX_FIELDS * 1024  # a body may exceed max_upload_mb by its other parts' heads
RETRY_AFTER_S = 2  # what a 429 asks the client to wait
CHUNK_BYTES = round(FILE_FRAME_S * RATE) * 4  # audio read into the task at a time: a CapsWriter file frame's
UPLOAD_READ_BYTES = 256 * 2**10
CLOSE_TIMEOUT_S = 3.0  # at stop: answers still being written after this are cut off
V1 = "/v1/"


def task_error(code: str, message: str) -> ApiError:
    """A task's error (a final frame's, or its refusal) as the API answers it."""
    status = TASK_ERROR_STATUS.get(code, 500)
    return ApiError(status, message, code, retry_after=RETRY_AFTER_S if status == 429 else None)


class Transcription(Holding):
    """The owner of one request's task (task.Owner): its result, and what it holds of the
    supervisor's memory, against a CapsWriter file connection's bounds."""

    def __init__(self, intake: Intake, partials: bool) -> None:
        super().__init__(intake, MAX_BUFFERED_AUDIO_BYTES)
        self.partials = partials  # streamed: partial results are kept
        self.final: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.partial: dict[str, Any] | None = None
        self.changed = asyncio.Event()  # a partial result came, or the final one

    def send(self, frame: str, partial: bool = False) -> None:
        if partial:
            if self.partials:
                self.partial = json.loads(frame)
                self.changed.set()
        elif not self.final.done():
            self.final.set_result(json.loads(frame))
            self.changed.set()

    def ended(self, task: Task, error_frame: str | None = None) -> None:
        self.release(task)
        if error_frame:
            self.send(error_frame)


class Api:
    def __init__(
        self,
        cfg: ApiConfig,
        addr: str,
        keys: frozenset[str],
        home: Callable[[str], Slot],
        formatting: Callable[[], Formatting],
        accepting: Callable[[], bool],
        answer_http: Callable[[str], Answer],
        intake: Intake,
        model_id: Callable[[], str],
    ) -> None:
        self.cfg = cfg
        self.addr = addr
        self.keys = keys
        self.home = home
        self.formatting = formatting
        self.accepting = accepting
        self.answer_http = answer_http
        self.intake = intake
        self.model_id = model_id
        self.decodes = asyncio.Semaphore(API_DECODES)
        self.in_progress = 0
        self.decoding = 0
        self.answered: Counter[int] = Counter()  # requests answered, by status
        self.handlers: set[asyncio.Task[Any]] = set()  # transcriptions in progress
        self.closing = False
        self.runner: web.AppRunner | None = None
        self.tmp: Path | None = None
        self.created = int(time.time())

    # -- life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(middlewares=[self.answer_errors], client_max_size=MAX_FIELD_BYTES)
        app.router.add_post("/v1/audio/transcriptions", self.transcriptions)
        app.router.add_post("/v1/audio/translations", self.translations)
        app.router.add_get("/v1/models", self.models)
        for path in ("/livez", "/readyz", "/metrics"):
            app.router.add_get(path, self.health)
        # handler_cancellation: a client that goes away cancels its handler, and so its task.
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=CLOSE_TIMEOUT_S)
        await self.runner.setup()
        self.tmp = Path(tempfile.mkdtemp(prefix="capsd-api-"))
        await web.TCPSite(self.runner, self.addr, self.cfg.port, reuse_address=True).start()
        log.info("api listening", addr=self.addr, port=self.cfg.port, keys=len(self.keys))

    async def close(self) -> None:
        """Stop listening; a request still uploading or decoding (stop_timeout_s has passed) is
        answered 503; a client that does not read its answer is cut off after CLOSE_TIMEOUT_S."""
        self.closing = True
        for handler in self.handlers:
            handler.cancel()
        if self.runner is not None:
            await self.runner.cleanup()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def reload(self, cfg: ApiConfig) -> None:
        """SIGHUP: the keys file read again (a file that cannot be read, or leaves a listener off
        loopback without keys, keeps the keys in use); max_upload_mb applies to the next request."""
        try:
            keys = read_keys(cfg)
            check_keys(cfg, self.addr, keys)
        except ConfigError as e:
            log.error("api keys not reloaded: keeping the keys in use", reason=str(e))
            return
        self.cfg = cfg
        if keys != self.keys:
            log.info("api keys reloaded", keys=len(keys))  # how many, never which
        self.keys = keys

    def status(self) -> dict[str, Any]:
        return {"requests_in_progress": self.in_progress, "decoding": self.decoding,
                "answered": {str(k): v for k, v in sorted(self.answered.items())}}  # fmt: skip

    # -- every request ------------------------------------------------------------------------------

    @web.middleware
    async def answer_errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Errors in OpenAI's shape, and one log line per API request."""
        if not request.path.startswith(V1):
            return await handler(request)
        started = time.monotonic()
        request["audio_s"] = 0.0
        status, code = 0, None
        try:
            response = await handler(request)
            status = response.status
            code = request.get("code")
            return response
        except ApiError as e:
            status, code = e.status, e.code
            return web.json_response(e.body(), status=e.status, headers=e.headers())
        except web.HTTPException as e:  # the router's 404 and 405
            status, code = e.status, e.reason.lower().replace(" ", "_")
            return web.json_response(error_body(e.status, f"{request.method} {clip(request.path)}: {e.reason}", code),
                                     status=e.status, headers={"Allow": e.headers["Allow"]} if "Allow" in e.headers else None)  # fmt: skip
        except asyncio.CancelledError:
            status, code = 499, "client_closed"  # nginx's figure for a client gone before its answer
            raise
        finally:
            self.answered[status] += 1
            (log.info if status < 500 or status == 503 else log.warning)(
                "api request", method=request.method, path=clip(request.path), status=status, code=code,
                peer=request.remote, model=request.get("model"), format=request.get("format"),
                task=request.get("task"), bytes=request.get("bytes", 0), audio_s=round(request["audio_s"], 2),
                time_s=round(time.monotonic() - started, 3))  # fmt: skip

    def authorize(self, request: web.Request) -> None:
        if not self.keys:
            return  # no keys: on loopback, or allow_anonymous (checked at start)
        key = bearer(request.headers.get("Authorization"))
        given = (key or "").encode("utf-8", "replace")
        if key is None or not any(hmac.compare_digest(given, k.encode()) for k in self.keys):
            missing = not request.headers.get("Authorization")
            raise ApiError(401, "no API key given: send Authorization: Bearer KEY" if missing
                           else "incorrect API key provided", "invalid_api_key")  # fmt: skip

    async def health(self, request: web.Request) -> web.Response:
        answer = self.answer_http(request.path)
        return web.Response(status=answer.status, body=answer.body, headers={"Content-Type": answer.content_type})

    async def models(self, request: web.Request) -> web.Response:
        self.authorize(request)
        model = {"id": self.model_id(), "object": "model", "created": self.created, "owned_by": "capsd"}
        return web.json_response({"object": "list", "data": [model]})

    async def translations(self, request: web.Request) -> web.Response:
        self.authorize(request)
        raise ApiError(400, "capsd's models transcribe and do not translate: use /v1/audio/transcriptions",
                       "unsupported_endpoint", final=True)  # fmt: skip

    # -- a transcription ------------------------------------------------------------------------------

    async def transcriptions(self, request: web.Request) -> web.StreamResponse:
        self.authorize(request)
        if not self.accepting():
            raise ApiError(503, "capsd is stopping", ErrorCode.SHUTTING_DOWN.value)
        self.too_large(request.content_length, MULTIPART_SLACK_BYTES)
        if self.in_progress >= API_MAX_REQUESTS:
            raise ApiError(429, f"{API_MAX_REQUESTS} requests are in progress, the most capsd takes at once",
                           ErrorCode.OVERLOADED.value, retry_after=RETRY_AFTER_S)  # fmt: skip
        assert self.tmp is not None
        self.in_progress += 1
        handler = asyncio.current_task()
        assert handler is not None
        self.handlers.add(handler)
        work = Path(tempfile.mkdtemp(dir=self.tmp))
        try:
            params = await self.receive(request, work / "upload")
            audio = work / "audio.f32"
            request["audio_s"] = await self.decode(work / "upload", audio)
            (work / "upload").unlink()
            self.handlers.discard(handler)  # a task now: the stop fails it (shutting_down) if it must
            return await self.transcribe(request, params, audio)
        except asyncio.CancelledError:
            if not self.closing:
                raise  # the client went away
            if sys.version_info >= (3, 11):
                handler.uncancel()  # answered, not cancelled: the stop's own cancel, taken back
            raise ApiError(503, "capsd is stopping", ErrorCode.SHUTTING_DOWN.value) from None
        finally:
            self.handlers.discard(handler)
            self.in_progress -= 1
            shutil.rmtree(work, ignore_errors=True)

    def too_large(self, size: int | None, slack: int = 0) -> None:
        limit = self.cfg.max_upload_mb * 2**20
        if size is not None and size > limit + slack:
            raise ApiError(413, f"the upload is larger than {self.cfg.max_upload_mb} MiB, [api] max_upload_mb",
                           "upload_too_large", "file", final=True)  # fmt: skip

    async def receive(self, request: web.Request, upload: Path) -> Params:
        """The multipart body: the file streamed to `upload`, the other fields read (bounded)."""
        if not request.content_type.startswith("multipart/form-data"):
            raise ApiError(400, "the body must be multipart/form-data with a file", "invalid_request")
        try:
            reader = await request.multipart()
            fields: dict[str, list[str]] = {}
            has_file, parts = False, 0
            while (part := await self.idle_bound(reader.next())) is not None:
                parts += 1
                if parts > MAX_FIELDS + 1:
                    raise ApiError(400, f"more than {MAX_FIELDS} fields", "invalid_request")
                if not isinstance(part, BodyPartReader):
                    raise ApiError(400, "a nested multipart body is not a field", "invalid_request")
                if part.name == "file":
                    if has_file:
                        raise ApiError(400, "more than one file", "invalid_request", "file")
                    request["bytes"] = await self.save(part, upload)
                    has_file = True
                else:
                    value = await self.field(part)
                    fields.setdefault(part.name or "", []).append(value)
        except ValueError as e:  # aiohttp's multipart reader on a malformed body
            raise ApiError(400, f"the multipart body cannot be read: {clip(str(e), 200)}", "invalid_request") from None
        params = parse_params(fields)
        request["model"], request["format"] = clip(params.model), params.response_format
        if not has_file:
            raise ApiError(400, "you must provide a file", "missing_required_parameter", "file")
        return params

    async def idle_bound(self, read: Awaitable[Any]) -> Any:
        try:
            return await asyncio.wait_for(read, UPLOAD_IDLE_S)
        except asyncio.TimeoutError:
            raise ApiError(400, f"the upload sent nothing for {UPLOAD_IDLE_S:g} s", "upload_timeout") from None

    async def save(self, part: BodyPartReader, path: Path) -> int:
        size = 0
        with path.open("wb") as out:
            while chunk := await self.idle_bound(part.read_chunk(UPLOAD_READ_BYTES)):
                size += len(chunk)
                self.too_large(size)
                out.write(chunk)
        return size

    async def field(self, part: BodyPartReader) -> str:
        data = bytearray()
        while chunk := await self.idle_bound(part.read_chunk(UPLOAD_READ_BYTES)):
            data += chunk
            if len(data) > MAX_FIELD_BYTES:
                raise ApiError(400, f"field {clip(part.name or '')!r} is longer than {MAX_FIELD_BYTES} bytes",
                               "invalid_value", part.name)  # fmt: skip
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, f"field {clip(part.name or '')!r} is not UTF-8", "invalid_value", part.name) from None

    async def decode(self, upload: Path, audio: Path) -> float:
        """Seconds of audio decoded from `upload` to `audio` by a process of its own, at most
        API_DECODES at once; ApiError 400 (not to be retried) if it fails, dies or hangs."""
        undecodable = "undecodable_file"
        async with self.decodes:
            self.decoding += 1
            with (upload.parent / "decode.out").open("w+") as out, (upload.parent / "decode.err").open("w+") as err:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "capsd.api.decode", str(upload), str(audio), str(MAX_AUDIO_S), str(os.getpid()),
                    stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err,
                )  # fmt: skip
                try:
                    await asyncio.wait_for(proc.wait(), DECODE_TIMEOUT_S)
                except asyncio.TimeoutError:
                    raise ApiError(400, f"the file took longer than {DECODE_TIMEOUT_S:g} s to decode", undecodable,
                                   "file", final=True) from None  # fmt: skip
                finally:
                    self.decoding -= 1
                    if proc.returncode is None:
                        proc.kill()
                        await asyncio.shield(proc.wait())
                out.seek(0)
                err.seek(0)
                said, why = out.read(4096), err.read(4096).strip().splitlines()
        if proc.returncode != 0:
            reason = why[-1] if why and proc.returncode == 1 else f"the decoder ended with exit code {proc.returncode}"
            raise ApiError(400, clip(reason, 300), undecodable, "file", final=True)
        return float(json.loads(said)["seconds"])

    async def transcribe(self, request: web.Request, params: Params, audio: Path) -> web.StreamResponse:
        """The decoded audio as a file task; its answer in the format asked for."""
        task_id = request["task"] = f"api-{uuid.uuid4().hex}"
        slot = self.home(task_id)
        if refused := refusal(slot, False, self.accepting()):
            slot.count("api", refused[0])
            raise task_error(refused[0].value, refused[1])
        formatting = self.formatting()
        owner = Transcription(self.intake, params.stream)
        task = Task(task_id, "api", time.time(), slot, Segmenter(*FILE_SEG), owner, formatting)
        slot.accept(task)
        feeding = asyncio.ensure_future(self.feed(task, owner, audio))
        try:
            if params.stream:
                return await self.stream(request, owner, formatting)
            final = await owner.final
            request["code"] = final.get("error", {}).get("code")
            body, content_type = render(self.transcript(final), params)
            return web.Response(text=body, headers={"Content-Type": content_type})
        finally:
            feeding.cancel()
            if not task.done:
                task.cancel()  # the client went away: its jobs are dropped at once

    def transcript(self, final: dict[str, Any]) -> Transcript:
        """A final frame's result, or its error as an ApiError."""
        if error := final.get("error"):
            raise task_error(error["code"], error["message"])
        return Transcript(final["text"], final["tokens"], final["timestamps"], final["duration"])

    async def feed(self, task: Task, owner: Transcription, audio: Path) -> None:
        """The decoded audio into the task, a chunk at a time, each once the request's own bounds
        and the intake have room for it, as a CapsWriter file connection's frames."""
        with audio.open("rb") as f:  # on local disk, read in 60 s chunks: as short as a frame's parse
            size = os.fstat(f.fileno()).st_size
            read = 0
            while not task.done:
                await owner.room(owner.final)
                n = min(CHUNK_BYTES, size - read)
                async with self.intake.holding(n):
                    if task.done:
                        return
                    read += n
                    owner.feed(task, np.frombuffer(f.read(n), dtype="<f4"), read >= size)
                if read >= size:
                    return

    async def stream(self, request: web.Request, owner: Transcription, formatting: Formatting) -> web.StreamResponse:
        """Server-sent events: a `transcript.text.delta` as the merged text grows, then one
        `transcript.text.done` (docs/design.md#streaming); an error after the first byte is an
        `error` event, which the SDKs raise."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        deltas = Deltas(formatting.num, formatting.spell, formatting.punctuate, FILE_SEG[1] / 2)
        while not owner.final.done():
            await owner.changed.wait()
            owner.changed.clear()
            if owner.partial is not None and not owner.final.done():
                p, owner.partial = owner.partial, None
                if delta := deltas.partial(p["tokens"], p["timestamps"], p["duration"]):
                    await response.write(event({"type": "transcript.text.delta", "delta": delta}))
        final = owner.final.result()
        if error := final.get("error"):
            request["code"] = error["code"]
            await response.write(event({"type": "error", "error": error_body(TASK_ERROR_STATUS.get(error["code"], 500),
                                                                               error["message"], error["code"])["error"]}))  # fmt: skip
        else:
            if delta := deltas.final(final["text"]):
                await response.write(event({"type": "transcript.text.delta", "delta": delta}))
            await response.write(event({"type": "transcript.text.done", "text": final["text"]}))
        await response.write_eof()
        return response
