"""What must hold before any worker starts: model files that will load, a memory plan that fits,
addresses capsd can listen on.

Shared by `capsd` and `capsd check-config`, so both refuse the same things with the same words.
"""

from __future__ import annotations

import functools
import socket
from dataclasses import dataclass
from pathlib import Path

from capsd import memory, models, textformat
from capsd.api import keys as api_keys
from capsd.config import Config, ConfigError
from capsd.protocol import LONGEST_SEGMENT_S
from capsd.socketpath import control_socket, in_use, path_problem
from capsd.worker.messages import WARM_UP_S, WorkerSpec


@dataclass(frozen=True)
class Preflight:
    spec: WorkerSpec
    plan: memory.Plan
    estimate: memory.Estimate
    api_keys: frozenset[str] = frozenset()  # [api] keys_file's


def api_addr(cfg: Config) -> str:
    """Where the API listens: `[api] addr`, or `[server] addr` when that is ""."""
    return cfg.api.addr or cfg.server.addr


def model_dir(cfg: Config) -> Path:
    return Path(cfg.model.dir) if cfg.model.dir else models.EMBEDDED_MODEL_DIR


def worker(cfg: Config) -> tuple[WorkerSpec, memory.Estimate]:
    """The worker `cfg` describes and its planned peak memory; ConfigError names every problem
    with the model files. Used at start, by check-config and by a reload that changes [model]."""
    try:
        files = models.resolve_files(cfg.model.type, model_dir(cfg), cfg.model.files)
    except ValueError as e:
        raise ConfigError(f"config: [model] {e}") from None
    problems = models.check_files(cfg.model.type, files)
    punctuation = Path(cfg.model.punctuation) if cfg.model.punctuation else None
    punctuation_files = textformat.model_files(punctuation) if punctuation else []
    problems += [f"punctuation model file {p} does not exist" for p in punctuation_files if not p.is_file()]
    if problems:
        raise ConfigError(
            f"config: [model] type = {cfg.model.type!r}, dir = {str(model_dir(cfg))!r}: " + "; ".join(problems)
        )
    spec = WorkerSpec(
        cfg.model.type,
        files,
        cfg.workers.threads,
        punctuation=cfg.model.punctuation if cfg.format.punc else "",
        log_level=cfg.log.level,
        log_format=cfg.log.format,
        model_dir=str(model_dir(cfg)),
    )
    return spec, estimate(spec, cfg.workers.forked)


def estimate(spec: WorkerSpec, forked: bool) -> memory.Estimate:
    """A worker's planned peak, and its loader's if workers are forked (docs/design.md#workers-forked-from-a-loader)."""
    model_bytes = sum(p.stat().st_size for p in spec.files.values())
    punctuation_bytes = sum(p.stat().st_size for p in textformat.model_files(Path(spec.punctuation))) if spec.punctuation else 0
    peak = functools.partial(memory.estimate_worker_bytes, model_bytes, spec.threads, punctuation_bytes=punctuation_bytes)
    # The arena keeps its peak (docs/design.md#the-arena-keeps-its-peak): every worker is
    # planned for the longest segment; a loader decodes only its warm-up.
    if not forked:
        return memory.Estimate(peak(LONGEST_SEGMENT_S))
    return memory.Estimate(peak(LONGEST_SEGMENT_S, forked=True), loader=peak(WARM_UP_S))


def check(cfg: Config, available: memory.Available | None = None) -> Preflight:
    """Raise ConfigError naming every problem; spawns nothing."""
    spec, planned = worker(cfg)
    plan = memory.plan(
        cfg.workers.count,
        planned.worker,
        available or memory.read_available(),
        cfg.workers.memory_reserve_mb * memory.MIB,
        LONGEST_SEGMENT_S,
        cfg.server.max_message_bytes,
        loader_bytes=planned.loader,
        api=cfg.api.port != 0,
    )
    if not plan.fits:
        raise ConfigError(plan.message())
    keys = api_keys.read_keys(cfg.api)
    api_keys.check_keys(cfg.api, api_addr(cfg), keys)
    return Preflight(spec, plan, planned, keys)


def check_listen(cfg: Config, beside_running: bool = False) -> Path:
    """Raise ConfigError unless capsd can listen where cfg says; return the control socket's path.

    The port is not bound (capsd may be running on it); `beside_running` (check-config) accepts a
    control socket someone listens on, most likely the capsd this config is for.
    """
    check_addr(cfg.server.addr)
    if cfg.api.port:
        check_addr(api_addr(cfg), "[api] addr" if cfg.api.addr else "[server] addr")
    path = control_socket(cfg.control.socket)
    problem = path_problem(path) or (None if beside_running else in_use(path))
    if problem:
        shown = repr(cfg.control.socket) if cfg.control.socket else f"'' (default {path})"
        raise ConfigError(f"config: [control] socket = {shown} is refused: {problem}")
    return path


def check_addr(addr: str, key: str = "[server] addr") -> None:
    """Resolve addr as the server will and bind a throwaway socket to each address, on port 0."""
    refused = f"config: {key} = {addr!r} is refused"
    try:
        addresses = socket.getaddrinfo(addr, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, ValueError) as e:  # socket.gaierror, or UnicodeError from IDNA
        raise ConfigError(f"{refused}: it does not resolve ({getattr(e, 'strerror', None) or e})") from None
    for family, kind, proto, _, address in addresses:
        try:
            probe = socket.socket(family, kind, proto)
        except OSError:  # a family this kernel lacks: the server skips it too
            continue
        with probe:
            try:
                probe.bind(address)
            except OSError as e:
                raise ConfigError(f"{refused}: cannot listen on {address[0]} ({e.strerror})") from None
