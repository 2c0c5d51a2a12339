"""A real capsd for integration tests and benchmarks: a subprocess on a free port, real workers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from capsd import config, memory, preflight
from capsd.ctl import request
from tests.support.checks import wait_for

CAPSD = [sys.executable, "-m", "capsd.cli"]
# CAPSD_TEST_PRELOAD=false runs the integration tests with spawned workers, where a test does not
# choose ([workers] preload; .ci/run runs the fault tests so too).
PRELOAD = {"preload": os.environ["CAPSD_TEST_PRELOAD"] == "true"} if "CAPSD_TEST_PRELOAD" in os.environ else {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, config: Mapping[str, Mapping[str, Any]]) -> Path:
    """`config` (a dict a section) as a TOML file, readable by every user (capsd may run as
    another); returns `path`."""

    def value(v: Any) -> str:
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    text = (f"[{name}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in keys.items()) for name, keys in config.items())
    path.write_text("".join(text))
    path.chmod(0o644)
    return path


def peak_rss(pid: int) -> int:
    """A process's peak resident memory so far (VmHWM), in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


class Capsd:
    """A capsd process started from a config dict, its config and log in `tmp`; `stop()` sends
    SIGTERM and returns the exit code. The config gets a free port unless it names one, and a
    control socket in `tmp` unless it has a [control] section. `wrap` turns capsd's command line
    into the one to run (a sandbox, say); `popen` goes to subprocess.Popen."""

    def __init__(
        self,
        tmp: Path,
        config: Mapping[str, Mapping[str, Any]],
        wait: bool = True,
        wrap: Callable[[list[str]], list[str]] | None = None,
        **popen: Any,
    ) -> None:
        self.port = config.get("server", {}).get("port") or free_port()
        self.api_port = config.get("api", {}).get("port", free_port())
        control = config.get("control", {"socket": str(tmp / "control.sock")})
        self.socket = Path(control["socket"]) if "socket" in control else None
        workers = {**PRELOAD, **config.get("workers", {})}
        config = {"server": {**config.get("server", {}), "port": self.port}, "control": control,
                  "api": {**config.get("api", {}), "port": self.api_port}, **({"workers": workers} if workers else {}),
                  **{k: v for k, v in config.items() if k not in ("server", "control", "api", "workers")}}  # fmt: skip
        self.config_path = write_config(tmp / "capsd.toml", config)
        self.log_path = tmp / "capsd.log"
        self.log = self.log_path.open("w")
        argv = [*CAPSD, "--config", str(self.config_path)]
        env = {**popen.pop("env", os.environ), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            wrap(argv) if wrap else argv, stdout=self.log, stderr=subprocess.STDOUT, env=env, **popen
        )
        self.url = f"ws://127.0.0.1:{self.port}"
        self.api_url = f"http://127.0.0.1:{self.api_port}/v1"  # the OpenAI SDK's base_url
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        """Until capsd says it is ready (right after its state becomes ready); an AssertionError
        with its log if it exits first or is not ready within `timeout` s."""

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"capsd exited {self.proc.returncode}:\n{self.logs()}")
            return "capsd ready" in self.logs()

        wait_for(ready, timeout, f"capsd ready in {self.log_path}", every=0.02)

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

    def plan(self) -> memory.Plan:
        """The memory plan capsd makes for this config (as `capsd check-config` prints it)."""
        return preflight.check(config.load(str(self.config_path))).plan

    def peak_rss(self) -> int:
        """The supervisor process's peak resident memory so far (VmHWM), in bytes."""
        return peak_rss(self.proc.pid)

    def reset_peak_rss(self) -> None:
        """Start the supervisor's peak (VmHWM) afresh from its RSS now: "5" written to its
        /proc/PID/clear_refs (proc(5)), which the process's owner may write."""
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
