"""The runtime calls of a scope's entry and exit make no Python object.

They are built-in functions over the library's METH_FASTCALL adapters
(allocpolicy/_fastcalls.py, native/src/pycall.c): their arguments arrive in
an array and their statuses are small ints. Whatever a boundary makes is the
new instance's and may be refused, so making nothing is part of what makes
the entry safe, and part of what makes it cheap.
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

# Counts every request of the thread, Python's small objects included.
COUNTED = r"""
import contextlib, itertools, sys
import allocpolicy

if sys.argv[1] == "install":
    allocpolicy.install({"scopes": {"request": {"on_oom": "raise", "budget": "16 MiB"}}})
reused = allocpolicy.task("request")
with reused, allocpolicy.task("request"), allocpolicy.scope("request"):
    pass  # the name's id looked up, the caches warm
null = contextlib.nullcontext()

def reused_task():
    for _ in itertools.repeat(None, 1000):
        with reused:
            pass

def new_task():
    for _ in itertools.repeat(None, 1000):
        with allocpolicy.task("request"):
            pass

def new_scope():
    for _ in itertools.repeat(None, 1000):
        with allocpolicy.scope("request"):
            pass

def reused_null():
    for _ in itertools.repeat(None, 1000):
        with null:
            pass

def new_null():
    for _ in itertools.repeat(None, 1000):
        with contextlib.nullcontext():
            pass

for loop in (reused_task, new_task, new_scope, reused_null, new_null):
    with allocpolicy.count_allocs(domains=["libc", "py_mem", "py_obj"]) as counted:
        loop()
    assert counted.checked
    print(loop.__name__, counted.allocations)
"""


def test_a_block_entered_and_left_allocates_what_nullcontext_does(tmp_path):
    # GIVEN 1,000 blocks of each kind, every allocation of the thread counted
    out = check(run_python(COUNTED, POLICY, tmp_path, args=("preload",)))
    counted = {name: int(n) for name, n in (line.split() for line in out.splitlines())}
    # THEN a task or scope block allocates no more than the same `with` of
    # nullcontext() (the statement's bound methods, the object when one is
    # made per block, which for nullcontext has a dict too), give or take a
    # few for the loop itself: nothing per entry or exit (an id() of the
    # block, an argument tuple, a result)
    assert counted["reused_task"] < counted["reused_null"] + 20, counted
    assert counted["new_task"] < counted["new_null"] + 20, counted
    assert counted["new_scope"] < counted["new_null"] + 20, counted
    # (each loop did allocate: the count is real)
    assert counted["reused_null"] >= 1000, counted


CALLS = r"""
import allocpolicy
from allocpolicy import _native

rt = _native.runtime()
for call, args in ((rt.enter_marked, (1,)), (rt.exit_tagged, ()), (rt.exited_seq, (1,)),
                   (rt.enter_plain, ("request",)), (rt.step_leave, (0, 0, None))):
    try:
        call(*args)
    except TypeError as exc:
        print(call.__name__, "TypeError:", exc)
    else:
        print(call.__name__, "accepted")
print("depth", rt.current()[1])
with allocpolicy.task("request"):
    print("inside", rt.current()[1])
"""


def test_the_runtime_calls_refuse_wrong_arguments_and_enter_nothing(tmp_path):
    out = check(run_python(CALLS, POLICY, tmp_path))
    lines = out.splitlines()
    # THEN each wrong call is a TypeError, raised before the runtime is called
    assert lines[:5] == [
        "ap_enter_marked TypeError: wrong number of arguments to an allocpolicy runtime call",
        "ap_exit_tagged TypeError: wrong number of arguments to an allocpolicy runtime call",
        "ap_exited_seq TypeError: wrong number of arguments to an allocpolicy runtime call",
        "ap_enter_plain TypeError: 'str' object cannot be interpreted as an integer",
        "ap_step_leave TypeError: 'NoneType' object cannot be interpreted as an integer",
    ], out
    # AND nothing was entered by them; a task still enters and leaves
    assert lines[5:] == ["depth 0", "inside 1"], out


@pytest.mark.parametrize("mode", ["preload", "install"])
def test_the_calls_are_builtin_functions_in_both_modes(tmp_path, mode):
    program = r"""
import sys, types
import allocpolicy
from allocpolicy import _native
if sys.argv[1] == "install":
    allocpolicy.install()
rt = _native.runtime()
print(sorted({type(f).__name__ for f in (rt.exit_tagged, rt.exited_seq, rt.step_enter, rt.step_leave, rt._exit)}))
"""
    out = check(run_python(program, POLICY, tmp_path, args=(mode,), preload=mode == "preload"))
    assert out.strip() == "['builtin_function_or_method']"
