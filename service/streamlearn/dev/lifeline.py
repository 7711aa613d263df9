"""Child processes that die with their parent, even when the parent is killed with SIGKILL.

`streamlearn up` and `streamlearn broker` stop their children themselves on SIGINT and SIGTERM;
a kill -9 leaves them no chance, so the kernel does it: Linux's PR_SET_PDEATHSIG, set in the
child between fork and exec, sends the child a signal when its parent goes. Elsewhere (macOS)
there is no such call, and children outlive a killed parent as before.
"""

import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl  # type: ignore[no-any-return]


_PRCTL = _load_prctl()  # resolved here: the child between fork and exec should do as little as it can


def die_with_parent(signum: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A `preexec_fn` for Popen that has the child sent `signum` when this process dies, or None
    where that cannot be arranged (not Linux, or not called from the main thread)."""
    if _PRCTL is None:
        return None
    # The kernel signals the child when the *thread* that forked it exits, not the process: only
    # the main thread lives as long as the process.
    if threading.current_thread() is not threading.main_thread():
        log.debug("a child started off the main thread does not die with its parent")
        return None
    prctl, parent = _PRCTL, os.getpid()

    def set_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the call above: no signal will come
            os.kill(os.getpid(), signum)

    return set_death_signal
