"""Fault injection for the tests: named crash points, and records that make our own code raise.

STREAMLEARN_CRASH_AT=point[:n][,point[:n]...]: the n-th time (default: first) the process
reaches a named point it kills itself with SIGKILL, as a power cut or the OOM killer would: no
cleanup, no flush. Under torchrun, STREAMLEARN_CRASH_RANK=r[,r...] pairs the points with ranks:
in the group's i-th run (torchrun's restart count i) only the i-th point applies, on rank r_i.
STREAMLEARN_RAISE_ON=marker: decoding a micro-batch raises RuntimeError when one of its values
contains the marker, as a bug of ours would. Unset, each costs a lookup.

Test-only, yet not in dev/: the crash points sit in the trainer's data path (snapshot publish,
offset commit, dead-letter send), so train/ imports this module, and train/ never imports dev/.
"""

import functools
import os
import signal
from collections.abc import Sequence

_reached: dict[str, int] = {}


@functools.cache
def _plan() -> dict[str, int]:
    plan: dict[str, int] = {}
    items = [item for item in os.environ.get("STREAMLEARN_CRASH_AT", "").split(",") if item]
    ranks = os.environ.get("STREAMLEARN_CRASH_RANK")
    if ranks is not None:
        run = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        ranks_of_runs = ranks.split(",")
        if run >= min(len(items), len(ranks_of_runs)) or ranks_of_runs[run] != os.environ.get("RANK", "0"):
            return plan
        items = [items[run]]
    for item in items:
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


@functools.cache
def _marker() -> bytes:
    return os.environ.get("STREAMLEARN_RAISE_ON", "").encode()


def raise_on_marked(values: Sequence[bytes | None]) -> None:
    marker = _marker()
    if marker and any(value and marker in value for value in values):
        raise RuntimeError("injected fault: a value holds STREAMLEARN_RAISE_ON's marker")
