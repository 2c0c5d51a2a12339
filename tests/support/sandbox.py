"""What running capsd as another user, or under a sandboxed systemd, needs to carry over from
this install."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import capsd


def install_paths() -> list[Path]:
    """What capsd needs to run from this install: the venv, the interpreter's install, capsd's source."""
    paths = {Path(os.path.realpath(p)) for p in (sys.prefix, sys.base_prefix, Path(capsd.__file__).parents[1])}
    return sorted(p for p in paths if not any(q in p.parents for q in paths))


def closed_ancestor(path: Path) -> Path | None:
    """The outermost directory above `path` that other users cannot enter (/root, usually)."""
    return next((p for p in reversed(path.parents) if p != Path("/") and not os.stat(p).st_mode & 0o001), None)
