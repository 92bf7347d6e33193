"""Run a command; fail if any process it started outlives it.

    python3 .ci/no_leftovers.py CMD [ARG...]

This process becomes a child subreaper (prctl PR_SET_CHILD_SUBREAPER), so a
descendant whose parent exits is re-parented here instead of to init and
cannot slip away. When the command has exited, every process still under
here is listed and killed, and the exit status is 1 (else the command's own).
"""

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


def children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            pass
    return found


def descendants(pid: int) -> list[int]:
    out, todo = [], children(pid)
    while todo:
        child = todo.pop()
        out.append(child)
        try:
            todo += children(child)
        except FileNotFoundError:
            pass
    return out


def describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f"{pid}: " + f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return f"{pid}: (gone)"


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    status = subprocess.call(argv)
    # Reap what already exited; whatever is left is running.
    time.sleep(0.5)
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
    left = descendants(os.getpid())
    if not left:
        return status
    print(f"no_leftovers: {len(left)} process(es) outlived `{' '.join(argv)}`:", file=sys.stderr)
    for pid in left:
        print("  " + describe(pid), file=sys.stderr)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
