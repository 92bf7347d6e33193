"""A child forked while another thread is inside the runtime's Python or
native critical sections can use the runtime at once."""

from __future__ import annotations

import textwrap

import pytest
from runtime_run import check, run_python


def test_fork_while_another_thread_is_inside_ap_configure(build_c, run_preloaded):
    # GIVEN a thread that is almost always inside ap_configure()
    # WHEN the main thread forks, again and again, and each child configures
    proc = run_preloaded([build_c("fork_configure")])
    # THEN no child waits for the configure its parent was doing
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == "40 children configured\n"


# A thread is held inside the critical section (at the ctypes call it makes
# there) while the main thread forks; the child then makes the same call. A
# child that waits for the lock its parent's thread held is killed after a
# generous delay, and says so.
FORK_INSIDE = """
    import os, signal, threading
    import allocpolicy
    from allocpolicy import _native

    rt = _native.runtime()
    inside, go_on = threading.Event(), threading.Event()
    real = getattr(rt, CALL)

    def held(*args):
        inside.set()
        go_on.wait()
        return real(*args)

    setattr(rt, CALL, held)
    thread = threading.Thread(target=PARENT)
    thread.start()
    inside.wait()
    pid = os.fork()
    if pid == 0:
        setattr(rt, CALL, real)
        CHILD()
        os._exit(0)
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (os.waitpid(pid, 0), done.set()))
    waiter.start()
    if not done.wait(60):
        print("the child deadlocked")
        os.kill(pid, signal.SIGKILL)
    waiter.join()
    go_on.set()
    thread.join()
    print("parent done")
"""


CONFIGURE_PARENT = """
def PARENT():
    allocpolicy.configure({"scopes": {"parent": {"budget": "8 MiB"}}})
"""
CONFIGURE_CHILD = """
def CHILD():
    allocpolicy.configure({"scopes": {"child": {"budget": "1 MiB"}}})
    try:
        with allocpolicy.task("child"):
            bytearray(2 << 20)
    except allocpolicy.AllocError as err:
        print("child refused:", err.scope, err.budget)
"""
INJECT_PARENT = """
def PARENT():
    allocpolicy.inject(nth=1000000)
"""
INJECT_CHILD = """
def CHILD():
    with allocpolicy.inject(scope="task", nth=1):
        try:
            with allocpolicy.task("task"):
                bytearray(1 << 20)
        except allocpolicy.AllocError as err:
            print("child refused:", err.scope, err.reason)
"""


@pytest.mark.parametrize(
    "call, parent, child, refused",
    [
        ("configure", CONFIGURE_PARENT, CONFIGURE_CHILD, f"child refused: child {1 << 20}"),
        ("inject_set", INJECT_PARENT, INJECT_CHILD, "child refused: task injected"),
    ],
    ids=["configure", "inject"],
)
def test_fork_while_another_thread_is_inside(tmp_path, call, parent, child, refused):
    code = f"CALL = {call!r}\n" + textwrap.dedent(parent) + textwrap.dedent(child) + textwrap.dedent(FORK_INSIDE)
    out = check(run_python(code, None, tmp_path))
    assert out.splitlines() == [refused, "parent done"]
