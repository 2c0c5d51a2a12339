"""Clumsy operators and hostile neighbours: the control socket's path, who may use it, what it
accepts, and the descriptors capsd allows itself. Every refusal is one line and an exit code.

Tests that need another user run the real capsd or capsctl as `nobody` in a mount namespace of
their own (root only): a fresh /tmp and /run, so nothing is left on the host, and the Python
install made reachable for nobody where its parent (/root, usually) is closed to other users.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import resource
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from capsd.control_protocol import ControlError, Request, parse_request
from capsd.selftest.tones import synth, write_wav
from tests.support.checks import assert_exact, run_client
from tests.support.daemon import CAPSD, Capsd, free_port, write_config
from tests.support.sandbox import closed_ancestor, install_paths

CTL = [sys.executable, "-m", "capsd.ctl"]
NOBODY = pwd.getpwnam("nobody")
ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The refusal: exactly one line on stderr, no traceback, nothing on stdout."""
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout == "", done.stdout
    return done.stderr


@pytest.fixture
def work() -> Iterator[Path]:
    """A directory every user can enter (pytest's tmp_path is in root's private /tmp/pytest-of-root)."""
    path = Path(tempfile.mkdtemp(prefix="capsd-operator-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def config_file(work: Path, config: Mapping[str, Mapping[str, Any]]) -> Path:
    """work/capsd.toml: `config` with a free port and the log in plain lines."""
    server = {"port": free_port(), **config.get("server", {})}
    return write_config(work / "capsd.toml", {**config, "server": server, "log": {"format": "console"}})


@pytest.fixture
def daemons(work: Path, start_capsd: Callable[..., Capsd]) -> Callable[..., Capsd]:
    """capsd started in `work`, in this file's plain environment, its log in plain lines."""

    def start(config: Mapping[str, Mapping[str, Any]], **options: Any) -> Capsd:
        return start_capsd({**config, "log": {"format": "console"}}, directory=work, env=ENV, **options)

    return start


def control_line(path: Path, line: bytes, timeout: float = 60) -> dict[str, Any]:
    """Send raw bytes on the control socket; the one reply line, parsed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(line)
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            assert chunk, f"closed without a reply; got {data!r}"
            data += chunk
    assert data.count(b"\n") == 1
    return json.loads(data)


def status(path: Path) -> dict[str, Any]:
    reply = control_line(path, b'{"cmd": "status"}\n')
    assert reply["ok"], reply
    return reply


# -- another user, in a mount namespace of its own ------------------------------------------------


def sandbox_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root, to run capsd as nobody in a mount namespace"
    if not all(shutil.which(tool) for tool in ("unshare", "setpriv", "nsenter")):
        return "needs unshare, setpriv and nsenter"
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True)
    return f"cannot create a mount namespace: {probe.stderr.strip()}" if probe.returncode else None


SANDBOX_SKIP_REASON = sandbox_skip_reason()
needs_sandbox = pytest.mark.skipif(SANDBOX_SKIP_REASON is not None, reason=SANDBOX_SKIP_REASON or "")


def sandboxed(
    argv: list[str],
    user: str | None = "nobody",
    keep: tuple[Path, ...] = (),
    setup: tuple[str, ...] = (),
    binds: Mapping[str, Path] | None = None,
) -> list[str]:
    """argv in a new mount namespace with a fresh /tmp and /run, holding `keep` (test directories)
    and the install where they were; then `setup` (shell, as root), `binds` (a path inside: a
    directory outside), and argv exec'd as `user` (None: root) without supplementary groups."""
    closed = sorted({a for p in install_paths() if (a := closed_ancestor(p))})
    hidden = ("/tmp", "/run", *map(str, closed))
    carried = [p for p in [*install_paths(), *keep] if any(p.is_relative_to(h) for h in hidden)]
    moves = [(src, src) for src in carried] + [(src, Path(inside)) for inside, src in (binds or {}).items()]
    q = shlex.quote
    lines = ["set -eu", "mount -t tmpfs -o mode=0755 tmpfs /run", "mkdir /run/hold"]
    for i, (src, _) in enumerate(moves):  # held in the new /run while the mounts below hide them
        lines.append(f"mkdir /run/hold/{i} && mount --rbind {q(str(src))} /run/hold/{i}")
    lines.append("mount -t tmpfs -o mode=1777 tmpfs /tmp")
    lines += [f"mount -t tmpfs -o mode=0755 tmpfs {q(str(a))}" for a in closed]
    for i, (_, inside) in enumerate(moves):
        lines.append(f"mkdir -p {q(str(inside))} && mount --move /run/hold/{i} {q(str(inside))}")
    lines += [*setup, "cd /"]
    if user:
        entry = pwd.getpwnam(user)
        lines.append(f"exec setpriv --reuid={entry.pw_uid} --regid={entry.pw_gid} --clear-groups -- {shlex.join(argv)}")
    else:
        lines.append(f"exec {shlex.join(argv)}")
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(lines)]


def run_as(user: str | None, argv: list[str], **sandbox: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(sandboxed(argv, user, **sandbox), capture_output=True, text=True, env=ENV, timeout=120)


# -- 1. the control socket's path -----------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("command", [["check-config"], []], ids=["check-config", "capsd"])
def test_a_file_at_the_socket_path_is_refused_and_kept(work: Path, command: list[str]) -> None:
    """Even the config file itself: capsd never deletes what is not a stale socket."""
    config = work / "capsd.toml"
    config.write_text(f'[control]\nsocket = "{config}"\n')
    before = config.read_bytes()
    done = subprocess.run([*CAPSD, *command, "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == os.EX_CONFIG
    assert "[control] socket" in one_line(done) and f"{config} exists and is not a socket" in done.stderr
    assert config.read_bytes() == before


@pytest.mark.integration
def test_a_live_socket_is_refused_and_left_alone(work: Path) -> None:
    path = work / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen()
        inode = path.stat().st_ino
        config = config_file(work, {"control": {"socket": str(path)}})
        done = subprocess.run([*CAPSD, "--config", str(config)], capture_output=True, text=True, timeout=60)
        assert done.returncode == os.EX_CONFIG
        assert f"another process is listening on {path}" in one_line(done) and "[control] socket" in done.stderr
        # check-config accepts it: the listener is most likely the capsd this config is for.
        checked = subprocess.run([*CAPSD, "check-config", "--config", str(config)], capture_output=True, text=True)
        assert checked.returncode == 0 and f"control socket: {path}" in checked.stdout, checked.stderr
        assert path.stat().st_ino == inode
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))  # still the other process's socket


@pytest.mark.integration
def test_a_stale_socket_is_replaced_and_removed_at_stop(work: Path, daemons: Callable[..., Capsd]) -> None:
    path = work / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # closed without unlinking, as by a capsd that was SIGKILLed
    assert stat.S_IMODE(path.stat().st_mode) != 0o660
    daemon = daemons({"control": {"socket": str(path)}})
    assert stat.S_IMODE(path.stat().st_mode) == 0o660  # capsd's own now
    assert status(path)["state"] == "ready"
    # check-config works beside the running daemon: the port is not bound, the socket is in use.
    checked = subprocess.run([*CAPSD, "check-config", "--config", str(daemon.config_path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert daemon.stop() == 0
    assert not path.exists()


@pytest.mark.integration
def test_stop_leaves_a_socket_that_is_not_its_own(work: Path, daemons: Callable[..., Capsd]) -> None:
    path = work / "control.sock"
    daemon = daemons({"control": {"socket": str(path)}})
    path.unlink()  # someone took the path meanwhile: a second instance, say
    time.sleep(0.1)  # a new change time, even on a coarse clock (the inode number may well be reused)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen()
        assert daemon.stop() == 0
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))  # still there, still the other process's


@pytest.mark.integration
@pytest.mark.parametrize("command", [["check-config"], []], ids=["check-config", "capsd"])
def test_a_socket_path_beyond_the_unix_limit_is_refused(work: Path, command: list[str]) -> None:
    path = work / ("s" * (108 - len(str(work)))) / "control.sock"
    config = config_file(work, {"control": {"socket": str(path)}})
    done = subprocess.run([*CAPSD, *command, "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == os.EX_CONFIG
    assert "[control] socket" in one_line(done) and "at most 107" in done.stderr


@pytest.mark.integration
@pytest.mark.parametrize("addr", ["999.1.1.1", "no-such-host.invalid", "192.0.2.1"])
@pytest.mark.parametrize("command", [["check-config"], []], ids=["check-config", "capsd"])
def test_an_address_capsd_cannot_listen_on_is_refused(work: Path, command: list[str], addr: str) -> None:
    config = config_file(work, {"server": {"addr": addr}, "control": {"socket": str(work / "c.sock")}})
    done = subprocess.run([*CAPSD, *command, "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == os.EX_CONFIG
    assert f"[server] addr = '{addr}' is refused" in one_line(done)
    assert "worker" not in done.stderr


HOSTILE = {
    "someone else's, open to all": "mkdir -m 0777 {d}",
    "capsd's user's, open to others": "mkdir -m 0755 {d} && chown nobody {d}",
    "a symlink": "mkdir -m 0700 /tmp/elsewhere && chown nobody /tmp/elsewhere && ln -s /tmp/elsewhere {d}",
}


@pytest.mark.integration
@needs_sandbox
@pytest.mark.parametrize("made_by", HOSTILE.values(), ids=HOSTILE.keys())
@pytest.mark.parametrize("command", [["check-config"], []], ids=["check-config", "capsd"])
def test_a_fallback_directory_others_made_is_refused(work: Path, command: list[str], made_by: str) -> None:
    """Without $XDG_RUNTIME_DIR the socket goes under /tmp/capsd-UID, where anyone may be first."""
    directory = f"/tmp/capsd-{NOBODY.pw_uid}"
    config = config_file(work, {})
    done = run_as("nobody", [*CAPSD, *command, "--config", str(config)], keep=(work,),
                  setup=(made_by.format(d=directory),))  # fmt: skip
    assert done.returncode == os.EX_CONFIG
    assert "[control] socket" in one_line(done) and f"{directory} " in done.stderr and "0700" in done.stderr


@pytest.mark.integration
@needs_sandbox
@pytest.mark.parametrize("user", ["nobody", None], ids=["nobody", "root"])
def test_the_fallback_directory_is_made_private(work: Path, daemons: Callable[..., Capsd], user: str | None) -> None:
    uid = NOBODY.pw_uid if user else 0
    directory = f"/tmp/capsd-{uid}"
    # Root's default is /run/capsd: root uses the fallback directory only when configured to.
    control = {"socket": f"{directory}/capsd/control.sock"} if user is None else {}  # {}: capsd's default
    daemon = daemons({"control": control}, wrap=lambda argv: sandboxed(argv, user, keep=(work,)))
    inside = Path(f"/proc/{daemon.proc.pid}/root")  # capsd's own /tmp, seen from here
    made = (inside / directory.lstrip("/")).lstat()
    assert (stat.S_ISDIR(made.st_mode), made.st_uid, stat.S_IMODE(made.st_mode)) == (True, uid, 0o700)
    # capsctl as the same user finds the socket by itself.
    enter = ["nsenter", f"--target={daemon.proc.pid}", "--mount", "--"]
    as_user = ["setpriv", f"--reuid={uid}", f"--regid={NOBODY.pw_gid if user else 0}", "--clear-groups", "--"]
    argv = [*enter, *as_user, *CTL, *([] if user else ["--socket", f"{directory}/capsd/control.sock"]), "status"]
    done = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=60, cwd="/")
    assert done.returncode == 0 and "ready" in done.stdout, done.stderr
    assert daemon.stop() == 0


# -- 2. capsctl without permission ----------------------------------------------------------------


@pytest.mark.integration
@needs_sandbox
def test_capsctl_without_permission_exits_77_with_one_line(work: Path, daemons: Callable[..., Capsd]) -> None:
    run_dir = work / "run"
    run_dir.mkdir(mode=0o750)
    run_dir.chmod(0o750)  # root's, as /run/capsd is the service's: nobody may not enter
    path = run_dir / "control.sock"
    daemon = daemons({"control": {"socket": str(path)}})
    pid = status(path)["slots"][0]["pid"]
    wav = work / "private.wav"
    write_wav(str(wav), synth("1")[0])
    wav.chmod(0o600)
    attempts = {
        "--socket": [*CTL, "--socket", str(path), "status"],
        "default socket": [*CTL, "status"],  # capsctl looks for /run/capsd/control.sock, then connects
        "restart-worker": [*CTL, "restart-worker", "0", "--force"],
        "transcribe": [*CTL, "transcribe", str(wav)],
    }
    for name, argv in attempts.items():
        done = run_as("nobody", argv, keep=(work,), binds={"/run/capsd": run_dir})
        assert done.returncode == os.EX_NOPERM, (name, done.stderr)
        assert "permission denied" in one_line(done), name
    assert status(path)["slots"][0]["pid"] == pid
    assert daemon.stop() == 0


# -- 3. a config file capsd cannot read (the other cases are in test_cli.py) ----------------------


@pytest.mark.integration
@needs_sandbox
@pytest.mark.parametrize("command", [["check-config"], []], ids=["check-config", "capsd"])
def test_an_unreadable_config_is_refused(work: Path, command: list[str]) -> None:
    config = config_file(work, {})
    config.chmod(0o600)
    done = run_as("nobody", [*CAPSD, *command, "--config", str(config)], keep=(work,))
    assert done.returncode == os.EX_CONFIG
    assert f"cannot read {config}: Permission denied" in one_line(done)


# -- 4. control requests ---------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("line", "words"),
    [
        (b"status\n", "not a line of JSON"),
        (b"\xff\xfe\n", "not a line of JSON"),
        (b"[" * 60000 + b"\n", "not a line of JSON"),
        (b'"status"\n', "not a JSON object"),
        (b'{"cmd": 5}\n', "cmd = 5"),
        (b'{"cmd": "reboot"}\n', "cmd = 'reboot'"),
        (b'{"slot": 0}\n', "cmd = None"),
        (b'{"cmd": "status", "json": true}\n', "status takes no 'json'"),
        (b'{"cmd": "restart-worker"}\n', "slot = None"),
        (b'{"cmd": "restart-worker", "slot": 1e400}\n', "slot = inf"),
        (b'{"cmd": "restart-worker", "slot": 0.9}\n', "slot = 0.9"),
        (b'{"cmd": "restart-worker", "slot": 0.0}\n', "slot = 0.0"),
        (b'{"cmd": "restart-worker", "slot": false}\n', "slot = False"),
        (b'{"cmd": "restart-worker", "slot": "0"}\n', "slot = '0'"),
        (b'{"cmd": "restart-worker", "slot": 0, "force": "false"}\n', "force = 'false'"),
        (b'{"cmd": "restart-worker", "slot": 0, "force": 0}\n', "force = 0"),
        (b'{"cmd": "restart-worker", "slot": 0, "timeout": "abc"}\n', "timeout = 'abc'"),
        (b'{"cmd": "restart-worker", "slot": 0, "timeout": 0}\n', "timeout = 0"),
        (b'{"cmd": "restart-worker", "slot": 0, "timeout": -1}\n', "timeout = -1"),
        (b'{"cmd": "restart-worker", "slot": 0, "timeout": NaN}\n', "timeout = nan"),
        (b'{"cmd": "restart-worker", "slot": 0, "timeout": 1e400}\n', "timeout = inf"),
        (b'{"cmd": "restart-worker", "slot": 0, "timeout": 1' + b"0" * 400 + b"}\n", "timeout = 1000"),
        (b'{"cmd": "restart-worker", "slot": 0, "timeout": true}\n', "timeout = True"),
        (b'{"cmd": "restart-worker", "slot": 0, "pid": 1}\n', "restart-worker takes no 'pid'"),
        (b'{"cmd": "scale"}\n', "count = None"),
        (b'{"cmd": "scale", "count": 0}\n', "count = 0"),
        (b'{"cmd": "scale", "count": 2.0}\n', "count = 2.0"),
        (b'{"cmd": "scale", "count": true}\n', "count = True"),
        (b'{"cmd": "scale", "count": 2, "timeout": 0}\n', "timeout = 0"),
        (b'{"cmd": "scale", "count": 2, "slot": 1}\n', "scale takes no 'slot'"),
    ],
)
def test_a_malformed_control_request_is_refused_in_a_few_words(line: bytes, words: str) -> None:
    with pytest.raises(ControlError) as e:
        parse_request(line)
    assert words in str(e.value) and len(str(e.value)) < 300


@pytest.mark.unit
def test_every_well_formed_control_request_is_parsed() -> None:
    assert parse_request(b'{"cmd": "status"}') == Request("status")
    assert parse_request(b'{"cmd": "restart-worker", "slot": 1}') == Request("restart-worker", 1)
    line = b'{"cmd": "restart-worker", "slot": 0, "force": true, "timeout": 2}\n'
    assert parse_request(line) == Request("restart-worker", 0, True, 2.0)
    assert parse_request(b'{"cmd": "restart-worker", "slot": 0, "timeout": null}').timeout is None
    assert parse_request(b'{"cmd": "restart-worker", "slot": "all"}') == Request("restart-worker", None)
    assert parse_request(b'{"cmd": "scale", "count": 3, "timeout": 5}') == Request("scale", timeout=5.0, count=3)


@pytest.mark.unit
def test_capsctl_loads_no_supervisor_module() -> None:
    """capsctl speaks the control protocol (capsd.control_protocol) and finds the socket
    (capsd.socketpath): the daemon's modules, with multiprocessing and the slots, stay out."""
    code = "import sys, capsd.ctl; print(sorted(m for m in sys.modules if m.startswith('capsd.supervisor')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


@pytest.mark.integration
def test_an_invalid_control_request_does_nothing_and_says_why(start_capsd: Any) -> None:
    capsd = start_capsd()
    pid = capsd.worker_pid(0)
    for line in [
        b'{"cmd": "restart-worker", "slot": 1e400}\n',
        b'{"cmd": "restart-worker", "slot": 0.9}\n',
        b'{"cmd": "restart-worker", "slot": false}\n',
        b'{"cmd": "restart-worker", "slot": 0, "force": "false"}\n',
        b'{"cmd": "restart-worker", "slot": 0, "force": true, "timeout": "abc"}\n',
        b'{"cmd": "restart-worker", "slot": 0, "force": true, "extra": 1}\n',
        b"not json\n",
        b"[1, 2]\n",
        b"[" * 60000 + b"\n",
        b"{" + b" " * (70 * 1024) + b"}\n",  # longer than a request may be
    ]:
        reply = control_line(capsd.socket, line)
        assert reply["ok"] is False and reply["error"], (line[:60], reply)
        assert capsd.worker_pid(0) == pid, line[:60]
    assert "longer than 64 KiB" in control_line(capsd.socket, b" " * (100 * 1024) + b"\n")["error"]
    # A valid request still works, then the log shows no traceback.
    reply = control_line(capsd.socket, b'{"cmd": "restart-worker", "slot": 0, "force": true, "timeout": null}\n')
    assert reply["ok"] and reply["old_pid"] == pid and capsd.worker_pid(0) == reply["new_pid"] != pid
    assert "Traceback" not in capsd.logs()
    samples, starts = synth("2718")  # and a dictation is served as ever
    assert_exact(asyncio.run(run_client(capsd.url, [("after", "mic", samples, (15, 2))]))["after"], "2718", starts)


@pytest.mark.integration
def test_an_idle_control_connection_is_closed(start_capsd: Any) -> None:
    capsd = start_capsd()
    clients = []
    for sent in (b"", b'{"cmd": "sta'):  # nothing, or half a request
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(60)
        sock.connect(str(capsd.socket))
        sock.sendall(sent)
        clients.append(sock)
    started = time.monotonic()
    for sock in clients:
        with sock:
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        assert json.loads(data) == {"ok": False, "error": "bad request: no request line within 10 s", "refused": "bad request"}
    assert 5 < time.monotonic() - started < 50
    assert capsd.status()["state"] == "ready"


# -- 5. descriptors --------------------------------------------------------------------------------


def open_files_limit(pid: int) -> tuple[int, int]:
    line = next(x for x in Path(f"/proc/{pid}/limits").read_text().splitlines() if x.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


@pytest.mark.integration
def test_capsd_raises_its_open_files_limit(work: Path, daemons: Callable[..., Capsd]) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard limit ({hard}) leaves no room to start lower")

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    daemon = daemons({"control": {"socket": str(work / "c.sock")}}, preexec_fn=low_soft_limit)
    assert open_files_limit(daemon.proc.pid) == (hard, hard)
    assert "open files limit raised" in daemon.logs()
    assert daemon.stop() == 0


@pytest.mark.unit
def test_the_unit_sets_the_open_files_limit() -> None:
    unit = (Path(__file__).parents[1] / "systemd" / "capsd.service").read_text()
    assert "\nLimitNOFILE=65536\n" in unit


# -- 6. capsctl's global options -------------------------------------------------------------------


class FakeControl:
    """A control socket that records each request and answers as capsd would, or never answers."""

    def __init__(self, path: Path, answer: bool = True) -> None:
        self.requests: list[dict[str, Any]] = []
        self.answer = answer
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen()
        self.held: list[socket.socket] = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            request = json.loads(conn.makefile("rb").readline())
            self.requests.append(request)
            if self.answer:
                reply = {"ok": True, "slot": 0, "old_pid": 1, "new_pid": 2}
                if request["cmd"] == "status":
                    reply = {"ok": True, "version": "x", "pid": 1, "state": "ready", "uptime_s": 1, "slots": [],
                             "memory": {"planned_bytes": 0, "available_bytes": 0}}  # fmt: skip
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def fake_control(tmp_path: Path) -> Iterator[Callable[..., FakeControl]]:
    made: list[FakeControl] = []

    def make(answer: bool = True) -> FakeControl:
        made.append(FakeControl(tmp_path / f"fake{len(made)}.sock", answer))
        return made[-1]

    yield make
    for fake in made:
        fake.close()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "timeout"),
    [
        (["restart-worker", "0"], None),
        (["--timeout", "10", "restart-worker", "0"], 10.0),
        (["restart-worker", "0", "--timeout", "7"], 7.0),
        (["--timeout", "5", "restart-worker", "0", "--timeout", "7"], 7.0),
    ],
)
def test_capsctl_timeout_before_or_after_the_subcommand(
    fake_control: Callable[..., FakeControl], args: list[str], timeout: float | None
) -> None:
    fake = fake_control()
    where = fake.sock.getsockname()
    before, after = (["--socket", where], []) if args[0] == "--timeout" else ([], ["--socket", where])
    done = subprocess.run([*CTL, *before, *args, *after], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert fake.requests == [{"cmd": "restart-worker", "slot": 0, "force": False, "timeout": timeout}]


@pytest.mark.integration
@pytest.mark.parametrize("position", ["before", "after"])
def test_capsctl_status_honours_timeout(fake_control: Callable[..., FakeControl], position: str) -> None:
    fake = fake_control(answer=False)
    options = ["--socket", fake.sock.getsockname(), "--timeout", "1"]
    argv = [*CTL, *options, "status"] if position == "before" else [*CTL, "status", *options]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == os.EX_UNAVAILABLE
    assert "did not answer" in one_line(done) and "within 1 s" in done.stderr  # not status's default, 10 s


@pytest.mark.integration
def test_capsctl_transcribe_honours_timeout_and_url_anywhere(tmp_path: Path) -> None:
    wav = tmp_path / "tones.wav"
    write_wav(str(wav), synth("1")[0])
    with socket.socket() as silent:  # accepts the TCP connection, never answers the handshake
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"ws://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        done = subprocess.run([*CTL, "--timeout", "1", "transcribe", str(wav), "--url", url],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    assert time.monotonic() - started < 30
    assert done.returncode == os.EX_UNAVAILABLE and url in one_line(done)


@pytest.mark.integration
def test_capsctl_global_options_against_a_real_capsd(start_capsd: Any) -> None:
    capsd = start_capsd()
    where = str(capsd.socket)
    for argv in (["--socket", where, "--timeout", "30", "status"], ["status", "--socket", where, "--timeout", "30"]):
        done = subprocess.run([*CTL, *argv], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "ready" in done.stdout, done.stderr
    done = subprocess.run([*CTL, "--timeout", "20", "restart-worker", "0", "--socket", where],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0 and "new pid" in done.stdout, done.stderr


@pytest.mark.integration
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e308", "abc"])
def test_capsctl_refuses_a_timeout_that_is_not_a_positive_number(value: str) -> None:
    done = subprocess.run([*CTL, "status", "--timeout", value], capture_output=True, text=True, timeout=60)
    assert done.returncode == os.EX_USAGE and "allowed is a positive number of seconds" in done.stderr
