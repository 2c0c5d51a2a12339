"""Where the control socket lives, and whether capsd may take that path: one policy for the
daemon (which binds it), `capsd check-config` (which checks it first) and capsctl (which
connects to it).

capsd takes its socket path only when nothing is there or a stale socket is (one nobody listens
on); a private directory in /tmp is used only if it is capsd's user's alone.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

UNIX_PATH_MAX = 107  # sockaddr_un.sun_path: 108 bytes with the terminating NUL
# The system service's socket: systemd/capsd.service has RuntimeDirectory=capsd.
SYSTEM_SOCKET = Path("/run/capsd/control.sock")


def fallback_runtime_dir() -> Path:
    """Where a user without $XDG_RUNTIME_DIR keeps the control socket: in /tmp, so it must be private."""
    return Path(f"/tmp/capsd-{os.geteuid()}")


def control_socket(cfg_socket: str) -> Path:
    """The control socket path; capsd and capsctl resolve the same default."""
    if cfg_socket:
        return Path(cfg_socket)
    if os.environ.get("RUNTIME_DIRECTORY"):  # set by systemd's RuntimeDirectory=capsd
        return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0]) / "control.sock"
    if os.geteuid() == 0:
        return SYSTEM_SOCKET
    runtime = Path(os.environ["XDG_RUNTIME_DIR"]) if os.environ.get("XDG_RUNTIME_DIR") else fallback_runtime_dir()
    return runtime / "capsd" / "control.sock"


def path_problem(path: Path) -> str | None:
    """Why capsd may not take `path` for its control socket; None when nothing or a socket is there."""
    size = len(os.fsencode(path))
    if size > UNIX_PATH_MAX:
        return f"{path} is {size} bytes long; a unix socket path has at most {UNIX_PATH_MAX}"
    private = fallback_runtime_dir()
    if private in path.parents and (problem := private_dir_problem(private)):
        return problem
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"cannot look at {path}: {e.strerror}"
    if not stat.S_ISSOCK(mode):
        return f"{path} exists and is not a socket; capsd replaces nothing but a stale socket"
    return None


def private_dir_problem(directory: Path) -> str | None:
    """Anyone may create a directory in /tmp first: capsd uses it only if it is its user's alone."""
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"cannot look at {directory}: {e.strerror}"
    uid = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        why = "is not a directory"
    elif st.st_uid != uid:
        why = f"is owned by uid {st.st_uid}"
    elif st.st_mode & 0o077:
        why = f"has mode {stat.S_IMODE(st.st_mode):04o}"
    else:
        return None
    return (
        f"{directory} {why}; it must be a directory of mode 0700 owned by capsd's user (uid {uid}): "
        "remove it, or set $XDG_RUNTIME_DIR or [control] socket"
    )


def in_use(path: Path) -> str | None:
    """Why the socket at `path` is not stale (someone listens on it, or capsd cannot tell); None if stale."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(5)  # a listener with a full backlog makes connect wait
        try:
            probe.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except OSError as e:
            return f"cannot tell whether {path} is in use: {e.strerror or e}"
    return f"another process is listening on {path}"
