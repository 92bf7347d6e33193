"""Two defects of CPython 3.12 and 3.13 on allocation failure, shown without allocpolicy.

    python examples/sweep_stdlib/cpython_defects.py

A sweep of ``json.dumps`` finds both (docs/testing.rst, "Sweeping the
standard library"). Each check fails allocations with CPython's own
``_testcapi.set_nomemory`` and prints one line: the check's name, then
``present`` or ``absent``, then what this interpreter did. Exit status 0 when
every check ran, 2 without ``_testcapi`` (not every CPython installs it).
"""

from __future__ import annotations

import json
import os
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
    handed, which the enclosing function's constants still hold."""
    for _ in range(3):
        outer()  # warm: the next allocation of outer() is the function object
    code = next(c for c in outer.__code__.co_consts if getattr(c, "co_name", None) == "inner")
    held = sys.getrefcount(code) - 2  # not counting the argument and `code`
    alive = weakref.ref(code)
    del code
    _testcapi.set_nomemory(0, 1)  # fail the next allocation, only that one
    try:
        outer()
    except MemoryError:
        raised = True
    else:
        raised = False
    finally:
        _testcapi.remove_mem_hooks()
    if not raised:
        return "absent (the function was created: no allocation failed)"
    if alive() is None:
        # Freed, yet still in outer.__code__.co_consts: the next call of
        # outer() reads freed memory (it is not called again here).
        return "present (MemoryError; inner's code object was freed, while outer's constants still hold it)"
    after = sys.getrefcount(alive()) - 1  # not counting the argument
    if after < held:
        return f"present (MemoryError; inner's code object lost a reference: held {held} -> {after} time(s))"
    return f"absent (MemoryError; inner's code object kept its {after} reference(s))"


DOC = {"name": "widget", "tags": ["a", "b"] * 5, "sizes": list(range(30)), "price": 2.5}


def check_json_encoder() -> str:
    """The C encoder of json.dumps returns a result with the MemoryError of
    its last allocation still set. Each allocation of one call is failed in a
    child process of its own, so that the failures do not add up."""
    encode = json.encoder.c_make_encoder(
        None, None, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True
    )
    for _ in range(3):
        encode(DOC, 0)
    outcomes = []
    for k in range(1000):
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            _testcapi.set_nomemory(k, k + 1)
            try:
                encode(DOC, 0)
            except BaseException as exc:  # noqa: BLE001 - told to the parent
                _testcapi.remove_mem_hooks()
                cause = type(exc.__cause__).__name__ if exc.__cause__ else "nothing"
                said = f"{type(exc).__name__}: {exc}, caused by {cause}"
            else:
                _testcapi.remove_mem_hooks()
                said = "passed"
            os.write(wfd, said.encode())
            os._exit(0)
        os.close(wfd)
        with os.fdopen(rfd, "rb") as pipe:
            said = pipe.read().decode()
        os.waitpid(pid, 0)
        if said == "passed":
            break  # k is past the call's last allocation
        outcomes.append((k + 1, said))
    wrong = [(n, said) for n, said in outcomes if not said.startswith("MemoryError")]
    if wrong:
        n, said = wrong[0]
        return f"present (allocation {n} of {len(outcomes)} failed: {said})"
    return f"absent (each of its {len(outcomes)} allocations failed in turn raised MemoryError)"


def main() -> None:
    print(f"CPython {sys.version.split()[0]}")
    print("function creation:", check_function_creation())
    print("json encoder:", check_json_encoder())


if __name__ == "__main__":
    main()
