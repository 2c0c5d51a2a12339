"""`capsd [--config PATH]` and `capsd check-config [--config PATH]`."""

from __future__ import annotations

import os

# numpy's OpenBLAS starts a thread per core when it is imported. capsd's processes do no BLAS
# work (onnxruntime has its own), and a loader must have no thread besides its own to be forked
# (docs/design.md#workers-forked-from-a-loader): its processes inherit this before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import asyncio
import resource
import sys

import structlog

from capsd import config, log, memory, preflight
from capsd.config import ConfigError


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # sysexits: a bad command line is 64, not argparse's 2; one line
        self.exit(os.EX_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(prog="capsd", description="Speech-recognition server for CapsWriter-Offline clients.")
    parser.add_argument("command", nargs="?", choices=["run", "check-config"], default="run")
    parser.add_argument("--config", metavar="PATH", help="config file (default: $CAPSD_CONFIG, /etc/capsd/capsd.toml)")
    return parser.parse_args(argv)


def raise_open_files_limit() -> None:
    """Every client connection is a descriptor, and a soft limit of 1024 is common: take the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:
        structlog.get_logger("capsd").warning("cannot raise the open files limit", soft=soft, hard=hard, error=str(e))
        return
    structlog.get_logger("capsd").info("open files limit raised", soft=soft, to=hard)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_config = args.command == "check-config"
    try:
        cfg = config.load(args.config)
        socket_path = preflight.check_listen(cfg, beside_running=check_config)
        checked = preflight.check(cfg)
    except ConfigError as e:
        print(f"capsd: {e}", file=sys.stderr)
        return os.EX_CONFIG
    if check_config:
        print(f"config {cfg.source}: ok")
        print(f"model: {cfg.model.type} in {preflight.model_dir(cfg)}")
        print(f"control socket: {socket_path}")
        print(checked.plan.message())
        return os.EX_OK
    log.setup(cfg.log.level, cfg.log.format)
    raise_open_files_limit()
    memory.hand_back_freed_memory()
    from capsd.supervisor.daemon import Daemon

    async def run() -> int:
        return await Daemon(cfg, checked, reload=lambda: config.load(args.config)).run()

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
