"""A process capsd's supervisor starts ends with it (docs/design.md#workers-forked-from-a-loader).

prctl(PR_SET_PDEATHSIG): the kernel kills the process when the supervisor's thread that started
it ends (each is started from the supervisor's main thread, or reparented to it). Imports
nothing heavy: a decode process calls it before it loads anything.
"""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1  # prctl(2)


def end_with(supervisor: int) -> None:
    """SIGKILL this process when `supervisor` ends; exit now if it already has."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != supervisor:  # it ended before prctl took effect
        os._exit(0)
