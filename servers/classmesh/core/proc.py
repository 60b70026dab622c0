"""Child processes of a ClassMesh server (media workers, the gateway beside `classmesh up`)."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import sys

__all__ = ["die_with_parent"]


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux prctl PR_SET_PDEATHSIG).

    Call it in the child (first thing, or as `preexec_fn`): it survives exec, so a child
    started by a server never outlives it, even when the server is killed with SIGKILL.
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
