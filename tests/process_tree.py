"""The processes under this one, read from /proc; and making this process
the one that orphans come back to.

Used by tests/conftest.py (no process a test starts may outlive the session)
and by .ci/no_leftovers.py (none a CI step starts may outlive the step).
"""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """prctl(PR_SET_CHILD_SUBREAPER): a descendant whose parent exits is
    re-parented to this process instead of to init, so it cannot slip away."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat ("R", "S", "Z", ...), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def children(pid: int) -> set[int]:
    """Direct children of ``pid``, of every one of its threads."""
    found: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.update(int(c) for c in f.read().split())
        except OSError:
            pass
    return found


def running_children(pid: int) -> set[int]:
    """Children of ``pid`` that still run (zombies are not counted)."""
    return {child for child in children(pid) if state(child) not in (None, "Z")}


def describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = "(gone)"
    return f"{pid}: {cmd[:300]}"


def kill_new_children(before: set[int]) -> list[str]:
    """Kill and reap every child of this process not in ``before``, and the
    descendants that come back here as they lose their parents; returns a
    description of each that was still running."""
    me = os.getpid()
    killed = []
    todo = sorted(children(me) - before)
    while todo:
        pid = todo.pop()
        if state(pid) not in (None, "Z"):
            killed.append(describe(pid))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        todo.extend(sorted(children(me) - before - set(todo)))
    return killed
