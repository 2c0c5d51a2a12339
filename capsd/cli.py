"""`capsd [--config PATH]` and `capsd check-config [--config PATH]` (CONTRACT.md section 1)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from capsd import config, log, memory, preflight
from capsd.config import ConfigError

EX_USAGE, EX_CONFIG = 64, 78


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # sysexits: a bad command line is 64, not argparse's 2
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(prog="capsd", description="Speech-recognition server for CapsWriter-Offline clients.")
    parser.add_argument("command", nargs="?", choices=["run", "check-config"], default="run")
    parser.add_argument("--config", metavar="PATH", help="config file (default: $CAPSD_CONFIG, /etc/capsd/capsd.toml)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = config.load(args.config)
        checked = preflight.check(cfg)
    except ConfigError as e:
        print(f"capsd: {e}", file=sys.stderr)
        return EX_CONFIG
    if args.command == "check-config":
        print(f"config {cfg.source}: ok")
        print(f"model: {cfg.model.type} in {preflight.model_dir(cfg)}")
        print(checked.plan.message())
        return 0
    log.setup(cfg.log.level, cfg.log.format)
    memory.hand_back_freed_memory()
    from capsd.supervisor.daemon import Daemon

    async def run() -> int:
        return await Daemon(cfg, checked, reload=lambda: config.load(args.config)).run()

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
