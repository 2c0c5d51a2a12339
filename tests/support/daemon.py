"""A real capsd for integration tests and benchmarks: a subprocess on a free port, real workers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from capsd.ctl import CtlError, request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


class Capsd:
    """A capsd process started from a config dict; `stop()` sends SIGTERM and returns the exit code."""

    def __init__(
        self,
        tmp: Path,
        config: dict[str, dict[str, Any]],
        wait: bool = True,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.port = free_port()
        self.socket = tmp / "control.sock"
        config = {
            "server": {"port": self.port, **config.get("server", {})},
            "control": {"socket": str(self.socket)},
            **{k: v for k, v in config.items() if k not in ("server", "control")},
        }
        self.config_path = tmp / "capsd.toml"
        self.config_path.write_text(
            "".join(
                f"[{section}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in keys.items())
                for section, keys in config.items()
            )
        )
        self.log_path = tmp / "capsd.log"
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "capsd.cli", "--config", str(self.config_path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=preexec_fn,
        )
        self.url = f"ws://127.0.0.1:{self.port}"
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"capsd exited {self.proc.returncode}:\n{self.log_path.read_text()}")
            if self.socket.exists():
                try:
                    if self.status()["state"] == "ready":
                        return
                except (OSError, CtlError):  # listening, not answering yet
                    pass
            time.sleep(0.1)
        raise AssertionError(f"capsd not ready after {timeout} s:\n{self.log_path.read_text()}")

    def status(self) -> dict[str, Any]:
        return request(self.socket, {"cmd": "status"}, 10)

    def control(self, **payload: Any) -> dict[str, Any]:
        return request(self.socket, payload, 120)

    def worker_pid(self, slot: int) -> int:
        return self.status()["slots"][slot]["pid"]

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log.close()

    def logs(self) -> str:
        return self.log_path.read_text()

    def peak_rss(self) -> int:
        """The supervisor process's peak resident memory so far (VmHWM), in bytes."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024

    def reset_peak_rss(self) -> None:
        """Start the supervisor's peak (VmHWM) afresh from its RSS now: "5" written to its
        /proc/PID/clear_refs (proc(5)), which the process's owner may write."""
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
