"""Named crash points, for the fault-injection tests: STREAMLEARN_CRASH_AT=point[:n][,point[:n]...].

The n-th time (default: first) the process reaches a named point it kills itself with SIGKILL,
as a power cut or the OOM killer would: no cleanup, no flush. Unset, a crash point costs a
dictionary lookup.
"""

import functools
import os
import signal

POINTS = ("snapshot.before_publish", "snapshot.after_publish", "commit.before", "dlq.after_send")
_reached: dict[str, int] = {}


@functools.cache
def _plan() -> dict[str, int]:
    plan = {}
    for item in filter(None, os.environ.get("STREAMLEARN_CRASH_AT", "").split(",")):
        name, _, nth = item.partition(":")
        plan[name.strip()] = int(nth or 1)
    return plan


def crash_point(name: str) -> None:
    plan = _plan()
    if name not in plan:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == plan[name]:
        os.kill(os.getpid(), signal.SIGKILL)
