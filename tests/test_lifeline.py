"""Children started with die_with_parent() end when their parent is killed with SIGKILL."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import wait_for

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

# A parent that starts a long sleeper the way `up` starts its children, says its pid, and waits.
PARENT = """
import subprocess, sys, time
from streamlearn.dev.lifeline import die_with_parent
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                         start_new_session=True, preexec_fn=die_with_parent())
print(child.pid, flush=True)
time.sleep(60)
"""


def running(pid: int) -> bool:
    """Whether any thread of the process runs: a zombie no one has reaped yet has ended, but its
    main thread is a zombie while the others still exit (and hold its sockets)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return False
    for task in tasks:
        try:
            stat = (task / "stat").read_text()
        except OSError:  # this thread ended meanwhile
            continue
        if stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
            return True
    return False


def children_of(pid: int) -> list[int]:
    """The pids of the processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # ended meanwhile
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@linux_only
def test_a_child_dies_with_its_parent_killed_by_sigkill():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        child = int(parent.stdout.readline())
        assert running(child)
        parent.kill()
        parent.wait()
        wait_for(lambda: not running(child), 10, what="the child to die with its parent")
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
        if child and running(child):
            os.kill(child, signal.SIGKILL)


@linux_only
def test_a_child_whose_parent_died_before_the_death_signal_was_set_ends_itself():
    # The race: the parent dies between fork and prctl, so the kernel will never signal the child.
    # The child sees it has another parent already and ends itself.
    script = (
        "import os\n"
        "from streamlearn.dev.lifeline import die_with_parent\n"
        "preexec = die_with_parent()\n"
        "os.getppid = lambda: 1\n"
        "preexec()\n"
        "print('survived')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == -signal.SIGKILL and "survived" not in done.stdout


def test_off_the_main_thread_no_death_signal_is_promised():
    # The kernel would signal the child when the forking thread exits, long before the parent.
    import threading

    from streamlearn.dev.lifeline import die_with_parent

    found = []
    thread = threading.Thread(target=lambda: found.append(die_with_parent()))
    thread.start()
    thread.join()
    assert found == [None]
