"""The one place that knows capsd's configuration: schema, defaults, validation, lookup.

Everything else receives a typed, frozen `Config`, never raw TOML. Each key's type comes from
its dataclass annotation and its range from a `Rule` in the field's metadata, so a refusal can
always name the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import stat
import sys
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsd import models

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_PATH = Path("/etc/capsd/capsd.toml")
# A config file is a few KiB; the bound keeps a wrong --config (a disk image, a log) from being read whole.
MAX_CONFIG_BYTES = 1 << 20
FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


class ConfigError(Exception):
    """A configuration capsd refuses to run with (exit 78)."""


@dataclass(frozen=True)
class Rule:
    allowed: str
    check: Callable[[Any], bool] = lambda _v: True


def _key(default: Any, allowed: str = "", check: Callable[[Any], bool] = lambda _v: True) -> Any:
    return field(default=default, metadata={"rule": Rule(allowed, check)})


def _at_least(low: float) -> dict[str, Any]:
    return {"allowed": f">= {low:g}", "check": lambda v: v >= low}


def _one_of(*choices: str) -> dict[str, Any]:
    return {"allowed": "one of " + ", ".join(repr(c) for c in choices), "check": lambda v: v in choices}


@dataclass(frozen=True)
class ServerConfig:
    addr: str = _key("127.0.0.1", "an IP address or host name", lambda v: v != "")
    port: int = _key(6016, "1..65535", lambda v: 1 <= v <= 65535)
    max_connections: int = _key(64, **_at_least(1))
    max_message_bytes: int = _key(16 * 1024 * 1024, **_at_least(1024))
    metrics: bool = _key(True)
    # capsd's own key, beyond the contract's: how long SIGTERM lets tasks in progress finish.
    # Keep it below the unit's TimeoutStopSec (30 s) minus the ~5 s workers get to stop.
    stop_timeout_s: float = _key(20.0, ">= 0", lambda v: v >= 0)


@dataclass(frozen=True)
class WorkersConfig:
    count: int = _key(1, **_at_least(1))
    threads: int = _key(1, **_at_least(1))
    max_rss_mb: int = _key(0, ">= 0 (0 = off)", lambda v: v >= 0)
    # A worker beats twice a second (docs/design.md#deadlines): one second is the least that can tell.
    heartbeat_timeout_s: float = _key(30.0, **_at_least(1))
    restart_intensity: int = _key(5, **_at_least(0))
    restart_period_s: float = _key(60.0, "> 0", lambda v: v > 0)
    queue_limit: int = _key(256, **_at_least(1))
    work_stealing: bool = _key(True)
    load_timeout_s: float = _key(120.0, "> 0", lambda v: v > 0)
    memory_reserve_mb: int = _key(512, **_at_least(0))
    retry_lost_jobs: int = _key(0, "0 (off) or 1 (a lost job runs once more)", lambda v: v in (0, 1))
    # With threads = 1, workers are forked from one loaded copy of the model per model
    # (docs/design.md#workers-forked-from-a-loader); false: each worker loads it itself.
    preload: bool = _key(True)

    @property
    def forked(self) -> bool:
        """Whether workers are to be forked from a loader: with one thread only (docs/design.md#workers-forked-from-a-loader)."""
        return self.preload and self.threads == 1


@dataclass(frozen=True)
class ModelConfig:
    type: str = _key("paraformer", **_one_of(*models.MODEL_TYPES))
    dir: str = _key("", 'a model directory, or "" for the embedded self-test model')
    punctuation: str = _key("", 'a CT-Transformer punctuation model directory, or ""')
    files: Mapping[str, str] = field(default_factory=dict)  # file-name overrides inside dir


@dataclass(frozen=True)
class FormatConfig:
    num: bool = _key(True)
    spell: bool = _key(True)
    punc: bool = _key(False)


@dataclass(frozen=True)
class ControlConfig:
    socket: str = _key("", 'a socket path, or "" for the default')


@dataclass(frozen=True)
class ApiConfig:
    """The OpenAI-compatible HTTP API (docs/design.md#the-openai-compatible-api)."""

    port: int = _key(6017, "0 (off) or 1..65535", lambda v: 0 <= v <= 65535)
    addr: str = _key("", 'an IP address or host name, or "" for [server] addr')
    keys_file: str = _key("", 'a file of bearer keys, one per line, or "" for none')
    allow_anonymous: bool = _key(False)
    max_upload_mb: int = _key(25, "1..2048", lambda v: 1 <= v <= 2048)


@dataclass(frozen=True)
class LogConfig:
    level: str = _key("info", **_one_of("debug", "info", "warning", "error"))
    format: str = _key("auto", **_one_of("auto", "journald", "json", "console"))


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    format: FormatConfig = field(default_factory=FormatConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str = "built-in defaults"  # where the config came from, for logs and check-config


TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _typed(key: str, value: Any, kind: type) -> Any:
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if kind is float and ok and not math.isfinite(value):
        ok = False
    if not ok:
        raise ConfigError(f"config: {key} = {value!r} is refused: allowed is {TYPE_NAMES[kind]}")
    return value


def _section(name: str, cls: type, table: Any) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"config: [{name}] = {table!r} is refused: allowed is a table")
    values: dict[str, Any] = {}
    types = typing.get_type_hints(cls)  # the annotations as types, not strings
    known = {f.name: f for f in dataclasses.fields(cls) if "rule" in f.metadata}
    model_type = table.get("type", "paraformer") if name == "model" else None
    known_type = isinstance(model_type, str) and model_type in models.MODEL_TYPES
    extra = set(models.file_keys(model_type)) if known_type else set()
    files: dict[str, str] = {}
    for key, value in table.items():
        where = f"[{name}] {key}"
        if key in extra:
            files[key] = _typed(where, value, str)
            continue
        if key not in known:
            allowed = ", ".join(sorted(set(known) | extra))
            raise ConfigError(f"config: {where} = {value!r} is refused: unknown key; allowed keys are {allowed}")
        spec = known[key]
        typed = _typed(where, value, types[key])
        rule: Rule = spec.metadata["rule"]
        if not rule.check(typed):
            raise ConfigError(f"config: {where} = {typed!r} is refused: allowed is {rule.allowed}")
        values[key] = typed
    if name == "model":
        values["files"] = files
    return cls(**values)


def from_dict(data: Mapping[str, Any], source: str = "built-in defaults") -> Config:
    sections = {f.name: f.default_factory for f in dataclasses.fields(Config) if f.name != "source"}
    values: dict[str, Any] = {}
    for name, table in data.items():
        if name not in sections:
            raise ConfigError(
                f"config: [{name}] is refused: unknown section; allowed are " + ", ".join(f"[{s}]" for s in sections)
            )
        values[name] = _section(name, type(sections[name]()), table)
    cfg = Config(**values, source=source)
    if cfg.format.punc and not cfg.model.punctuation:
        raise ConfigError('config: [format] punc = true is refused: it needs [model] punctuation = "<model dir>"')
    return cfg


def find_path(arg: str | None) -> Path | None:
    """The lookup order: --config, $CAPSD_CONFIG, /etc/capsd/capsd.toml if it exists, else None (defaults)."""
    if arg:
        return Path(arg)
    if os.environ.get("CAPSD_CONFIG"):
        return Path(os.environ["CAPSD_CONFIG"])
    return DEFAULT_PATH if _present(DEFAULT_PATH) else None


def _present(path: Path) -> bool:
    """Whether something is at `path`, counting what we may not look at (load then says so)."""
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        pass
    return True


def read_text(path: Path) -> str:
    """A regular file of at most MAX_CONFIG_BYTES of UTF-8, else a ConfigError naming it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO must not wait for a writer
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e.strerror}") from None
    kind = stat.S_IFMT(os.fstat(fd).st_mode)
    if kind != stat.S_IFREG:
        os.close(fd)
        raise ConfigError(f"config: cannot read {path}: it is {FILE_KINDS.get(kind, 'not a regular file')}")
    try:
        with open(fd, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"config: cannot read {path}: larger than {MAX_CONFIG_BYTES >> 20} MiB, the limit for a config"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config: {path} is not UTF-8: byte 0x{data[e.start]:02x} at offset {e.start}") from None


def load(arg: str | None = None) -> Config:
    path = find_path(arg)
    if path is None:
        return Config()
    try:
        data = tomllib.loads(read_text(path))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {path} is not valid TOML: {e}") from None
    return from_dict(data, source=str(path))
