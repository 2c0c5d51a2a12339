"""capsd's command line: check-config, refusals with exit 78, bad command lines with 64."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CAPSD = [sys.executable, "-m", "capsd.cli"]


def run(
    *args: str, config: str | None = None, tmp: Path | None = None
) -> tuple[subprocess.CompletedProcess[str], float]:
    argv = [*CAPSD, *args]
    if config is not None:
        assert tmp is not None
        (tmp / "capsd.toml").write_text(config)
        argv += ["--config", str(tmp / "capsd.toml")]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return done, time.monotonic() - started


def test_check_config_prints_the_plan_for_the_shipped_config() -> None:
    done, _ = run("check-config", "--config", str(Path(__file__).parent.parent / "etc" / "capsd.toml"))
    assert done.returncode == 0, done.stderr
    assert "memory plan fits" in done.stdout and "paraformer" in done.stdout


@pytest.mark.parametrize("command", [["check-config"], []])
def test_a_plan_that_cannot_fit_is_refused_fast_without_spawning(tmp_path: Path, command: list[str]) -> None:
    done, elapsed = run(*command, config="[workers]\ncount = 100000\n", tmp=tmp_path)
    assert done.returncode == 78
    assert elapsed < 20  # no worker spawned: one would take minutes for 100000
    message = done.stderr
    assert "memory plan does not fit" in message and "100000 workers" in message
    assert "available" in message and "set [workers] count = " in message
    assert "worker started" not in done.stdout + done.stderr


def test_two_workers_fit_on_this_machine(tmp_path: Path) -> None:
    done, _ = run("check-config", config="[workers]\ncount = 2\n", tmp=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "2 workers" in done.stdout


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ("[workers]\ncount = 0\n", ["[workers] count", "0", ">= 1"]),
        ('[workers]\nthreads = "2"\n', ["[workers] threads", "'2'", "an integer"]),
        ("[server]\nprot = 6016\n", ["[server] prot", "unknown key", "port"]),
        ('[model]\ndir = "/nonexistent/model"\n', ["/nonexistent/model", "does not exist"]),
        ("[workers\n", ["not valid TOML"]),
    ],
)
def test_bad_config_exits_78_naming_key_value_and_allowed(tmp_path: Path, config: str, words: list[str]) -> None:
    for command in (["check-config"], []):
        done, _ = run(*command, config=config, tmp=tmp_path)
        assert done.returncode == 78
        assert all(word in done.stderr for word in words), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_missing_config_file_is_refused(tmp_path: Path) -> None:
    done, _ = run("check-config", "--config", str(tmp_path / "absent.toml"))
    assert done.returncode == 78 and "absent.toml" in done.stderr


def non_utf8(tmp: Path) -> tuple[str, str]:
    (tmp / "latin1.toml").write_bytes('[log]\nlevel = "info" # caf\xe9\n'.encode("latin-1"))
    return str(tmp / "latin1.toml"), "is not UTF-8: byte 0xe9 at offset 26"


def oversized(tmp: Path) -> tuple[str, str]:
    (tmp / "big.toml").write_text("# padding\n" * 110_000)  # a valid TOML file of 1.1 MB
    return str(tmp / "big.toml"), "larger than 1 MiB"


def directory(tmp: Path) -> tuple[str, str]:
    return str(tmp), "it is a directory"


def fifo(tmp: Path) -> tuple[str, str]:
    os.mkfifo(tmp / "fifo.toml")  # nobody writes: reading it would wait for ever
    return str(tmp / "fifo.toml"), "it is a FIFO"


def dev_zero(_tmp: Path) -> tuple[str, str]:
    return "/dev/zero", "it is a character device"  # reading it would never end


@pytest.mark.parametrize("case", [non_utf8, oversized, directory, fifo, dev_zero], ids=lambda f: f.__name__)
@pytest.mark.parametrize("command", [["check-config"], []], ids=["check-config", "capsd"])
def test_a_config_path_capsd_cannot_read_is_refused_in_one_line(
    tmp_path: Path, command: list[str], case: Callable[[Path], tuple[str, str]]
) -> None:
    path, why = case(tmp_path)
    done, elapsed = run(*command, "--config", path)
    assert done.returncode == 78 and elapsed < 30
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    assert path in done.stderr and why in done.stderr, done.stderr


@pytest.mark.parametrize("args", [["--bogus"], ["frobnicate"], ["--config"]])
def test_bad_command_line_exits_64(args: list[str]) -> None:
    done, _ = run(*args)
    assert done.returncode == 64
    assert len(done.stderr.splitlines()) == 1 and "--help" in done.stderr, done.stderr


@pytest.mark.parametrize(
    "args", [["restart-worker"], ["restart-worker", "one"], ["nonsense"], [], ["--timeout", "0", "status"]]
)
def test_capsctl_bad_command_line_exits_64(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "capsd.ctl", *args], capture_output=True, text=True)
    assert done.returncode == 64
    assert len(done.stderr.splitlines()) == 1 and "--help" in done.stderr, done.stderr
