"""capsd/config.py: schema, defaults, refusals and lookup."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from capsd import config, models, socketpath
from capsd.config import Config, ConfigError

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent

# The contract's defaults, copied by hand so a changed default in config.py fails here.
DOCUMENTED_DEFAULTS: dict[str, dict[str, Any]] = {
    # stop_timeout_s is capsd's one extension, documented in the README.
    "server": {
        "addr": "127.0.0.1",
        "port": 6016,
        "max_connections": 64,
        "max_message_bytes": 16777216,
        "stop_timeout_s": 20.0,
        "metrics": True,
    },
    "workers": {
        "count": 1,
        "threads": 1,
        "max_rss_mb": 0,
        "heartbeat_timeout_s": 30,
        "restart_intensity": 5,
        "restart_period_s": 60,
        "queue_limit": 256,
        "work_stealing": True,
        "load_timeout_s": 120,
        "memory_reserve_mb": 512,
        "retry_lost_jobs": 0,
        "preload": True,
    },
    "model": {"type": "paraformer", "dir": "", "punctuation": ""},
    "format": {"num": True, "spell": True, "punc": False},
    "control": {"socket": ""},
    "api": {"port": 6017, "addr": "", "keys_file": "", "allow_anonymous": False, "max_upload_mb": 25},
    "log": {"level": "info", "format": "auto"},
}

# One valid, non-default value for every key of the contract.
VALID: dict[str, dict[str, Any]] = {
    "server": {
        "addr": "0.0.0.0",
        "port": 6017,
        "max_connections": 2,
        "max_message_bytes": 1 << 20,
        "stop_timeout_s": 5,
        "metrics": False,
    },
    "workers": {
        "count": 3,
        "threads": 2,
        "max_rss_mb": 900,
        "heartbeat_timeout_s": 2.5,
        "restart_intensity": 0,
        "restart_period_s": 10,
        "queue_limit": 1,
        "work_stealing": False,
        "load_timeout_s": 30,
        "memory_reserve_mb": 0,
        "retry_lost_jobs": 1,
        "preload": False,
    },
    "model": {"type": "sense_voice", "dir": "/srv/models/sv", "punctuation": "/srv/models/punc"},
    "format": {"num": False, "spell": False, "punc": True},
    "control": {"socket": "/tmp/x/control.sock"},
    "api": {"port": 0, "addr": "0.0.0.0", "keys_file": "/etc/capsd/api-keys", "allow_anonymous": True, "max_upload_mb": 100},
    "log": {"level": "debug", "format": "json"},
}


def as_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return {
        name: {k: v for k, v in dataclasses.asdict(getattr(cfg, name)).items() if k != "files"}
        for name in DOCUMENTED_DEFAULTS
    }


def refused(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as e:
        config.from_dict(data)
    return str(e.value)


def test_the_defaults_are_those_the_contract_documents() -> None:
    cfg = Config()
    assert as_dict(cfg) == DOCUMENTED_DEFAULTS
    assert dict(cfg.model.files) == {}
    assert config.from_dict({}) == cfg
    assert config.from_dict({name: {} for name in DOCUMENTED_DEFAULTS}) == cfg


def test_every_contract_key_is_a_config_field() -> None:
    for name, keys in DOCUMENTED_DEFAULTS.items():
        fields = {f.name for f in dataclasses.fields(getattr(Config(), name))} - {"files"}
        assert fields == set(keys), name


@pytest.mark.parametrize(("section", "key"), [(s, k) for s, keys in VALID.items() for k in keys])
def test_every_key_accepts_a_valid_value(section: str, key: str) -> None:
    value = VALID[section][key]
    data: dict[str, Any] = {section: {key: value}}
    if (section, key) == ("format", "punc"):
        data["model"] = {"punctuation": "/srv/punc"}
    cfg = config.from_dict(data)
    assert getattr(getattr(cfg, section), key) == value
    # Nothing else moved.
    expected = {s: dict(keys) for s, keys in DOCUMENTED_DEFAULTS.items()}
    expected[section][key] = value
    for s, keys in data.items():
        expected[s].update(keys)
    assert as_dict(cfg) == expected


def test_every_valid_key_at_once_is_accepted_as_given() -> None:
    cfg = config.from_dict(VALID, source="/x.toml")
    assert as_dict(cfg) == VALID
    assert cfg.source == "/x.toml"


def test_integer_accepted_for_seconds_keys() -> None:
    cfg = config.from_dict({"workers": {"heartbeat_timeout_s": 7, "restart_period_s": 90}})
    assert cfg.workers.heartbeat_timeout_s == 7.0
    assert isinstance(cfg.workers.heartbeat_timeout_s, float)
    assert cfg.workers.restart_period_s == 90.0


def test_an_unknown_section_is_refused_naming_the_sections_allowed() -> None:
    message = refused({"sever": {"port": 1}})
    assert "[sever]" in message
    assert "unknown section" in message
    assert "[server]" in message and "[workers]" in message  # what is allowed


def test_section_that_is_not_a_table() -> None:
    message = refused({"server": 5})
    assert "[server]" in message and "5" in message and "table" in message


@pytest.mark.parametrize(("section", "key"), [("server", "prot"), ("workers", "worker_processes"), ("log", "lvl")])
def test_an_unknown_key_is_refused_naming_the_keys_allowed(section: str, key: str) -> None:
    message = refused({section: {key: 1}})
    assert f"[{section}] {key}" in message
    assert "unknown key" in message
    for allowed in DOCUMENTED_DEFAULTS[section]:
        assert allowed in message


def test_model_files_is_not_a_key() -> None:
    assert "unknown key" in refused({"model": {"files": {"model": "x.onnx"}}})


@pytest.mark.parametrize(
    ("section", "key", "value", "allowed"),
    [
        ("workers", "count", "2", "an integer"),  # string for int
        ("server", "port", "6016", "an integer"),
        ("workers", "count", True, "an integer"),  # bool for int
        ("workers", "threads", 2.0, "an integer"),  # float for int
        ("workers", "max_rss_mb", 1.5, "an integer"),
        ("format", "num", 1, "true or false"),  # int for bool
        ("format", "spell", "yes", "true or false"),
        ("workers", "heartbeat_timeout_s", "30", "a number"),
        ("workers", "heartbeat_timeout_s", True, "a number"),
        ("workers", "restart_period_s", float("inf"), "a number"),
        ("workers", "restart_period_s", float("nan"), "a number"),
        ("server", "addr", 127, "a string"),
        ("model", "dir", ["a"], "a string"),
        ("model", "type", 1, "a string"),
        ("model", "type", ["paraformer"], "a string"),  # unhashable: must not crash the lookup
        ("model", "type", {"a": 1}, "a string"),
        ("control", "socket", False, "a string"),
        ("api", "keys_file", 1, "a string"),
        ("api", "allow_anonymous", "yes", "true or false"),
        ("api", "max_upload_mb", 2.5, "an integer"),
        ("log", "level", 20, "a string"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_saying_what_is_allowed(
    section: str, key: str, value: Any, allowed: str
) -> None:
    message = refused({section: {key: value}})
    assert f"[{section}] {key}" in message
    assert repr(value) in message
    assert allowed in message


@pytest.mark.parametrize(
    ("section", "key", "value", "allowed"),
    [
        ("workers", "count", 0, ">= 1"),
        ("workers", "count", -1, ">= 1"),
        ("workers", "threads", 0, ">= 1"),
        ("server", "port", 70000, "1..65535"),
        ("server", "port", 0, "1..65535"),
        ("server", "max_connections", 0, ">= 1"),
        ("server", "max_message_bytes", 10, ">= 1024"),
        ("server", "addr", "", "IP address"),
        ("workers", "max_rss_mb", -1, ">= 0"),
        ("workers", "heartbeat_timeout_s", 0.5, ">= 1"),
        ("workers", "heartbeat_timeout_s", -5.0, ">= 1"),
        ("workers", "retry_lost_jobs", 2, "0 (off) or 1"),
        ("workers", "restart_period_s", 0, "> 0"),
        ("workers", "restart_intensity", -1, ">= 0"),
        ("workers", "queue_limit", 0, ">= 1"),
        ("workers", "memory_reserve_mb", -512, ">= 0"),
        ("api", "port", 65536, "0 (off) or 1..65535"),
        ("api", "port", -1, "0 (off) or 1..65535"),
        ("api", "max_upload_mb", 0, "1..2048"),
        ("api", "max_upload_mb", 4096, "1..2048"),
        ("log", "level", "verbose", "'debug'"),
        ("log", "level", "INFO", "'info'"),
        ("log", "format", "xml", "'console'"),
        ("model", "type", "wav2vec", "'paraformer'"),
    ],
)
def test_a_value_out_of_range_is_refused_saying_what_is_allowed(
    section: str, key: str, value: Any, allowed: str
) -> None:
    message = refused({section: {key: value}})
    assert f"[{section}] {key}" in message
    assert repr(value) in message
    assert allowed in message


def test_unknown_model_type_lists_every_type() -> None:
    message = refused({"model": {"type": "wav2vec"}})
    for name in models.MODEL_TYPES:
        assert repr(name) in message


@pytest.mark.parametrize("type_name", list(models.MODEL_TYPES))
def test_a_model_types_file_names_may_be_overridden(type_name: str) -> None:
    keys = models.file_keys(type_name)
    overrides = {key: f"custom-{key}.bin" for key in keys}
    cfg = config.from_dict({"model": {"type": type_name, **overrides}})
    assert cfg.model.type == type_name
    assert dict(cfg.model.files) == overrides


def test_file_name_override_for_the_default_type() -> None:
    cfg = config.from_dict({"model": {"model": "x.onnx"}})
    assert cfg.model.type == "paraformer"
    assert dict(cfg.model.files) == {"model": "x.onnx"}


@pytest.mark.parametrize(
    ("type_name", "key"),
    [
        (t, key)
        for t in models.MODEL_TYPES
        for key in sorted(
            {k for other in models.MODEL_TYPES for k in models.file_keys(other)} - set(models.file_keys(t))
        )
    ],
)
def test_file_key_of_another_type_is_refused(type_name: str, key: str) -> None:
    message = refused({"model": {"type": type_name, key: "x.onnx"}})
    assert f"[model] {key}" in message
    assert "unknown key" in message
    for allowed in models.file_keys(type_name):
        assert allowed in message


def test_file_name_override_must_be_a_string() -> None:
    message = refused({"model": {"tokens": 5}})
    assert "[model] tokens" in message and "a string" in message


def test_punc_needs_a_punctuation_model() -> None:
    message = refused({"format": {"punc": True}})
    assert "punc" in message and "punctuation" in message
    cfg = config.from_dict({"format": {"punc": True}, "model": {"punctuation": "/srv/punc"}})
    assert cfg.format.punc is True


def test_a_missing_config_file_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as e:
        config.load(str(path))
    assert str(path) in str(e.value)
    assert "No such file" in str(e.value)


def test_invalid_toml_is_refused_naming_its_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nport = = 1\n")
    with pytest.raises(ConfigError) as e:
        config.load(str(path))
    assert str(path) in str(e.value)
    assert "not valid TOML" in str(e.value)
    assert "line 2" in str(e.value)


def test_load_refusal_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[workers]\ncount = 0\n")
    with pytest.raises(ConfigError, match=r"\[workers\] count = 0 .*>= 1"):
        config.load(str(path))


def test_load_reads_the_config_file_it_is_given(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[server]\nport = 7000\n[model]\ntype = "whisper"\nencoder = "base-encoder.onnx"\n')
    cfg = config.load(str(path))
    assert cfg.server.port == 7000
    assert cfg.model.type == "whisper"
    assert dict(cfg.model.files) == {"encoder": "base-encoder.onnx"}
    assert cfg.source == str(path)


@pytest.fixture
def no_config_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.delenv("CAPSD_CONFIG", raising=False)
    default = tmp_path / "etc" / "capsd.toml"
    monkeypatch.setattr(config, "DEFAULT_PATH", default)
    return default


def test_a_config_path_given_as_an_argument_comes_first(
    no_config_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    no_config_env.parent.mkdir()
    no_config_env.write_text("")
    monkeypatch.setenv("CAPSD_CONFIG", str(tmp_path / "env.toml"))
    assert config.find_path(str(tmp_path / "arg.toml")) == tmp_path / "arg.toml"


def test_without_an_argument_the_config_path_comes_from_capsd_config(
    no_config_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    no_config_env.parent.mkdir()
    no_config_env.write_text("")
    monkeypatch.setenv("CAPSD_CONFIG", str(tmp_path / "env.toml"))
    assert config.find_path(None) == tmp_path / "env.toml"
    assert config.find_path("") == tmp_path / "env.toml"


def test_find_path_default_file_if_it_exists(no_config_env: Path) -> None:
    assert config.find_path(None) is None
    no_config_env.parent.mkdir()
    no_config_env.write_text("")
    assert config.find_path(None) == no_config_env


def test_find_path_empty_environment_is_unset(no_config_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPSD_CONFIG", "")
    assert config.find_path(None) is None


def test_load_without_any_file_gives_defaults(no_config_env: Path) -> None:
    cfg = config.load(None)
    assert cfg == Config()
    assert cfg.source == "built-in defaults"


def test_load_without_a_path_reads_the_file_capsd_config_names(
    no_config_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "env.toml"
    path.write_text("[workers]\ncount = 4\n")
    monkeypatch.setenv("CAPSD_CONFIG", str(path))
    assert config.load(None).workers.count == 4


def test_load_follows_the_default_path(no_config_env: Path) -> None:
    no_config_env.parent.mkdir()
    no_config_env.write_text("[log]\nlevel = 'warning'\n")
    cfg = config.load(None)
    assert cfg.log.level == "warning"
    assert cfg.source == str(no_config_env)


@pytest.fixture
def runtime_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    return monkeypatch


def test_control_socket_configured_path_wins(runtime_env: pytest.MonkeyPatch) -> None:
    runtime_env.setenv("RUNTIME_DIRECTORY", "/run/capsd")
    runtime_env.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert socketpath.control_socket("/srv/c.sock") == Path("/srv/c.sock")


@pytest.mark.parametrize("euid", [0, 1000])
def test_under_systemd_the_control_socket_is_in_the_runtime_directory(
    runtime_env: pytest.MonkeyPatch, euid: int
) -> None:
    runtime_env.setattr(socketpath.os, "geteuid", lambda: euid)
    runtime_env.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    runtime_env.setenv("RUNTIME_DIRECTORY", "/run/capsd-x")
    assert socketpath.control_socket("") == Path("/run/capsd-x/control.sock")
    # Several RuntimeDirectory= entries: systemd joins them with ":".
    runtime_env.setenv("RUNTIME_DIRECTORY", "/run/capsd:/run/other")
    assert socketpath.control_socket("") == Path("/run/capsd/control.sock")


def test_as_root_the_control_socket_is_under_run_capsd(runtime_env: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("not running as root")
    assert socketpath.control_socket("") == Path("/run/capsd/control.sock")


@pytest.mark.parametrize(
    ("euid", "xdg", "expected"),
    [
        (0, "/run/user/0", "/run/capsd/control.sock"),
        (1000, "/run/user/1000", "/run/user/1000/capsd/control.sock"),
        (1000, None, "/tmp/capsd-1000/capsd/control.sock"),
    ],
    ids=["as root", "as user", "as user without XDG_RUNTIME_DIR"],
)
def test_outside_systemd_the_control_socket_follows_the_user_and_xdg_runtime_dir(
    runtime_env: pytest.MonkeyPatch, euid: int, xdg: str | None, expected: str
) -> None:
    runtime_env.setattr(socketpath.os, "geteuid", lambda: euid)
    if xdg:
        runtime_env.setenv("XDG_RUNTIME_DIR", xdg)
    assert socketpath.control_socket("") == Path(expected)


def test_repo_config_file_is_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    path = REPO / "etc" / "capsd.toml"
    if not path.exists():
        pytest.skip("etc/capsd.toml not written yet")
    monkeypatch.delenv("CAPSD_CONFIG", raising=False)
    cfg = config.load(str(path))
    assert dataclasses.replace(cfg, source=Config().source) == Config()
    assert as_dict(cfg) == DOCUMENTED_DEFAULTS


def test_stop_timeout_is_a_documented_extension() -> None:
    assert Config().server.stop_timeout_s == 20.0
    assert config.from_dict({"server": {"stop_timeout_s": 0}}).server.stop_timeout_s == 0.0
    with pytest.raises(ConfigError, match=r"\[server\] stop_timeout_s = -1\.0 .*>= 0"):
        config.from_dict({"server": {"stop_timeout_s": -1}})


def test_load_reads_only_a_regular_file(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    for path, why in [(tmp_path, "a directory"), (tmp_path / "fifo", "a FIFO"), (Path("/dev/null"), "a character")]:
        with pytest.raises(ConfigError, match=f"cannot read {path}: it is {why}"):
            config.load(str(path))


def test_a_config_file_larger_than_1_mib_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("#" * (config.MAX_CONFIG_BYTES - 1) + "\n")
    assert config.load(str(path)) == dataclasses.replace(Config(), source=str(path))
    path.write_text("#" * config.MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError, match="larger than 1 MiB"):
        config.load(str(path))


def test_load_refuses_what_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(b"[server]\nport = 1\xff\n")
    with pytest.raises(ConfigError, match=f"{path} is not UTF-8: byte 0xff at offset 17"):
        config.load(str(path))


def test_find_path_default_below_a_file_is_absent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CAPSD_CONFIG", raising=False)
    (tmp_path / "etc").write_text("")
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "etc" / "capsd.toml")
    assert config.find_path(None) is None


def test_the_fallback_runtime_dir_is_per_user(runtime_env: pytest.MonkeyPatch) -> None:
    runtime_env.setattr(socketpath.os, "geteuid", lambda: 1234)
    assert socketpath.fallback_runtime_dir() == Path("/tmp/capsd-1234")
    assert socketpath.control_socket("").parent.parent == socketpath.fallback_runtime_dir()
