"""A refusal of what a scope's entry itself allocates leaves nothing entered.

Entering from Python is a native call followed by Python bookkeeping (the
new instance's id read from ctypes, the frame a task keeps). Whatever that
bookkeeping allocates is already the new instance's, and may be refused; the
entry must then be undone before the MemoryError goes on, or the instance
stays attached to the thread with nobody to leave it, and everything the
thread runs afterwards (an event loop's own work included) is charged to it.
"""

from __future__ import annotations

import pytest

from runtime_run import check, run_python

POLICY = """
version = 1
[scopes.request]
on_oom = "raise"
budget = "16 MiB"
"""

PROGRAM = r"""
import asyncio, sys
import allocpolicy
from allocpolicy import _native

if sys.argv[1] == "install":
    allocpolicy.install({"scopes": {"request": {"on_oom": "raise", "budget": "16 MiB"}}})
rt = _native.runtime()
# Number every request of Python's domains, small objects included, as an
# OOM sweep does (without these layers pymalloc's pools are seen per arena).
rt.install_domain_hooks()

async def main():
    # An instance id past the small ints Python keeps ready-made (a slot
    # used before): reading it allocates.
    with allocpolicy.task("request"):
        pass
    # The first allocation inside the new instance is refused: in a task,
    # that is the entry's own (the instance's id, read after the native call).
    with allocpolicy.inject(scope="request", nth=1):
        try:
            with allocpolicy.task("request"):
                print("entered")
        except MemoryError as exc:
            print("entry refused:", type(exc).__name__)
    print("charged to:", rt.current()[0], "active:", allocpolicy.stats().scopes["request"].active)
    # The task goes on outside the scope: 32 MiB is over the scope's budget.
    await asyncio.sleep(0)
    print("after:", len(bytearray(32 << 20)))
    # And the scope works as before.
    try:
        with allocpolicy.task("request"):
            bytearray(32 << 20)
    except allocpolicy.AllocError as err:
        print("refused:", err.scope, err.reason)

asyncio.run(main())
"""


@pytest.mark.parametrize("mode", ["preload", "install"])
def test_a_refused_entry_in_a_task_leaves_the_thread_outside_the_scope(tmp_path, mode):
    out = check(run_python(PROGRAM, POLICY, tmp_path, args=(mode,), preload=mode == "preload"))
    assert out.splitlines() == [
        "entry refused: MemoryError",
        "charged to: 0 active: 0",
        f"after: {32 << 20}",
        "refused: request budget",
    ], out
