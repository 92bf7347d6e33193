"""Defects of CPython 3.12 and 3.13 on allocation failure, shown without allocpolicy.

    python examples/sweep_stdlib/cpython_defects.py

A sweep of a JSON round trip finds them (docs/testing.rst, "Sweeping the
standard library"): a failed function creation frees a code object still in
use (3.12, 3.13), json's C encoder returns a result with MemoryError set
(3.12, 3.13), json's C scanner crashes (3.13). Each check fails allocations with CPython's own
``_testcapi.set_nomemory`` and prints one line: the check's name, then
``present`` or ``absent`` (or ``not run``), then what this interpreter did.
Exit status 0 when every check ran, 1 when one could not, 2 without
``_testcapi`` (not every CPython installs it).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import weakref

try:
    import _testcapi
except ImportError:
    print("cpython_defects: this CPython has no _testcapi module", file=sys.stderr)
    sys.exit(2)


def outer():
    def inner(x=1.5):
        return x

    return inner


def check_function_creation() -> str:
    """A failed MAKE_FUNCTION gives up a reference to the code object it was
    handed, which the enclosing function's constants still hold. Run in a
    child process: the interpreter's exit would free that object again."""
    return in_child(function_creation)


def function_creation() -> str:
    for _ in range(3):
        outer()  # warm: the next allocation of outer() is the function object
    code = next(c for c in outer.__code__.co_consts if getattr(c, "co_name", None) == "inner")
    held = sys.getrefcount(code) - 2  # not counting the argument and `code`
    alive = weakref.ref(code)
    del code
    _testcapi.set_nomemory(0, 1)  # fail the next allocation, only that one
    try:
        outer()
    except MemoryError as exc:
        tb = exc.__traceback__
        while tb.tb_next:
            tb = tb.tb_next
        # The innermost frame is outer's, stopped at its `def inner`.
        failed = (tb.tb_frame.f_code is outer.__code__
                  and tb.tb_lineno == outer.__code__.co_firstlineno + 1)
        del exc, tb
    else:
        failed = False
    finally:
        _testcapi.remove_mem_hooks()
    if not failed:
        return "not run (the failed allocation was not the function's creation)"
    if alive() is None:
        # Freed, yet still in outer.__code__.co_consts: the next call of
        # outer() reads freed memory (it is not called again here).
        return "present (MemoryError; inner's code object was freed, while outer's constants still hold it)"
    after = sys.getrefcount(alive()) - 1  # not counting the argument
    if after < held:
        return f"present (MemoryError; inner's code object lost a reference: held {held} -> {after} time(s))"
    return f"absent (MemoryError; inner's code object kept its {after} reference(s))"


# Like a small API response (the one test_pytest_plugin.py sweeps).
DOC = {
    "users": [
        {"id": n, "name": f"user {n}", "email": f"user{n}@example.org",
         "roles": ["reader", "writer"][: 1 + n % 2], "bio": "lorem ipsum " * 60}
        for n in range(12)
    ],
    "next": None,
    "price": 2.5,
}


def in_child(job) -> str:
    """What ``job()`` says, run in a forked child (a crash ends only the child)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        try:
            said = job()
        except BaseException as exc:  # noqa: BLE001 - told to the parent
            said = f"not run ({type(exc).__name__}: {exc})"
        os.write(wfd, said.encode())
        os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as pipe:
        said = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return f"the process died of {signal.Signals(os.WTERMSIG(status)).name}"
    return said


def failing(call, k: int) -> str:
    """What ``call()`` does when its (k+1)th allocation fails, only that one."""
    _testcapi.set_nomemory(k, k + 1)
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 - told to the parent
        _testcapi.remove_mem_hooks()
        cause = f", caused by {type(exc.__cause__).__name__}" if exc.__cause__ else ""
        return f"{type(exc).__name__}: {exc}{cause}"
    _testcapi.remove_mem_hooks()
    return "passed"


def fail_each(call) -> list[tuple[int, str]]:
    """What ``call()`` does when its first, second, ... allocation fails, each
    in a child process of its own, so that failures do not add up: (n, what
    it did), up to its last allocation."""
    for _ in range(3):
        call()  # warm: caches filled, as in a long-running process
    outcomes = []
    for k in range(100_000):
        said = in_child(lambda: failing(call, k))  # noqa: B023 - called at once
        if said == "passed":
            return outcomes  # past the call's last allocation
        outcomes.append((k + 1, said))
    raise AssertionError("the call never passed")


def wrong(outcomes: list[tuple[int, str]]) -> str:
    """present/absent, with the first allocation of each wrong outcome."""
    firsts: dict[str, int] = {}
    for n, said in outcomes:
        if not said.startswith("MemoryError"):
            firsts.setdefault(re.sub(r" at 0x[0-9a-f]+", "", said), n)
    if firsts:
        return f"present ({len(outcomes)} allocations; " + "; ".join(
            f"allocation {n} failed: {said}" for said, n in firsts.items()) + ")"
    return f"absent (each of its {len(outcomes)} allocations failed in turn raised MemoryError)"


def check_json_encoder() -> str:
    """The C encoder of json.dumps returns a result with the MemoryError of
    its last allocation still set (called here without json.dumps' Python
    code, which a failed function creation would break first)."""
    encode = json.encoder.c_make_encoder(
        None, None, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True
    )
    return wrong(fail_each(lambda: encode(DOC, 0)))


def check_json_decoder() -> str:
    """json.loads' C scanner on 3.13: a failure while it grows the
    dictionary of the keys it has seen leaves that dictionary broken, and
    its next insertion crashes."""
    text = json.dumps(DOC)
    return wrong(fail_each(lambda: json.loads(text)))


def main() -> int:
    print(f"CPython {sys.version.split()[0]}")
    said = [(name, check()) for name, check in (("function creation", check_function_creation),
                                                ("json encoder", check_json_encoder),
                                                ("json decoder", check_json_decoder))]
    for name, what in said:
        print(f"{name}: {what}")
    return 1 if any(what.startswith("not run") for _, what in said) else 0


if __name__ == "__main__":
    sys.exit(main())
