"""What a task boundary reports, and what it leaves alone.

    allocpolicy run --policy docs/examples/nested_policy.toml -- python docs/examples/task_boundaries.py
"""

import threading

import allocpolicy

# A refusal that CPython reports as another exception still leaves the task as
# AllocError; the original exception is its __cause__. (The failure here is
# injected: the request's next allocation is refused.)
try:
    with allocpolicy.task("request"):
        with allocpolicy.inject(scope="request", nth=1):
            lock = threading.Lock()
except allocpolicy.AllocError as err:
    print(f"{err.reason} refusal, carried out as {type(err.__cause__).__name__}: {err.__cause__}")

# A refusal the task caught and handled does not label a later error.
try:
    with allocpolicy.task("request"):
        try:
            image = bytearray(100 << 20)
        except MemoryError:
            image = None  # go on without it
        raise ValueError("the request is malformed")
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}")

# Nor an exception that C code raises later for a reason of its own.
try:
    with allocpolicy.task("request"):
        try:
            image = bytearray(100 << 20)
        except MemoryError:
            image = None
        width = int("640px")
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}")


# Scopes leave in the reverse order of their entries; generators that hold a
# scope across a yield and resume in another order are told so.
def rows(name):
    with allocpolicy.scope(name):
        yield 1


first, second = rows("thumbnail"), rows("parse")
next(first)
next(second)
try:
    next(first)
except allocpolicy.ScopeMismatchError as err:
    print(str(err).split(":")[0])
next(second, None)
