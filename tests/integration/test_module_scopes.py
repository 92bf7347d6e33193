"""Scopes bound to Python modules (``modules = [...]`` in the policy).

Each case runs a small program under the preloaded runtime. The programs never
name the bound scope in their own code: binding is the policy's business. The
mechanism differs by version (sys.monitoring on 3.12+, wrappers on 3.11); the
behaviour checked here is the same on both.
"""

from __future__ import annotations

import signal
import struct
import sys
import zlib
from pathlib import Path

import pytest

from runtime_run import check, run_python

# A module bound to the scope "work" by the policies below. `where()` reports
# the calling thread's innermost instance and stack depth.
MYLIB = '''
from allocpolicy import _native

_rt = _native.runtime()
IMPORT_DEPTH = _rt.current()[1]  # the module body runs at import: not bound

def where():
    return _rt.current()[1]

def big(n):
    return bytearray(n)

def rec(k):
    if k == 0:
        return where()
    return rec(k - 1)

def call(fn):
    return fn()

def ping(k, last):
    # Calls that alternate between two functions: a record per activation.
    return last() if k == 0 else pong(k - 1, last)

def pong(k, last):
    return last() if k == 0 else ping(k - 1, last)

def fail(depth):
    if depth == 0:
        raise ValueError("bad input")
    fail(depth - 1)

def out_of_memory():
    raise MemoryError("not the runtime's")

def gen(n):
    for _ in range(n):
        yield where()

def consume():
    return [d for d in gen(3)] + [where()]

async def agen(n):
    for _ in range(n):
        yield _rt.current()[1]  # inline: where() would be a bound call of its own

async def acoro(log):
    for _ in range(3):
        log.append(("bound", where()))
        import asyncio
        await asyncio.sleep(0)
    return where()

class Thing:
    def method(self):
        return where()

    @staticmethod
    def static():
        return where()

    @classmethod
    def klass(cls):
        return where()

    @property
    def prop(self):
        return where()
'''

WORK = """
version = 1
[scopes.work]
on_oom = "{mode}"
budget = "{budget}"
modules = ["mylib"]
"""


def work_policy(mode: str = "raise", budget: str = "16 MiB") -> str:
    return WORK.format(mode=mode, budget=budget)


def run_with_mylib(code: str, policy: str | None, tmp_path: Path):
    (tmp_path / "mylib.py").write_text(MYLIB)
    assert '"work"' not in code and "'work'" not in code, "programs must not name the scope"
    return run_python(code, policy, tmp_path)


# --- The check: a decompression bomb in Pillow -------------------------------


def bomb_png(width: int, height: int) -> bytes:
    """A 1-bit grayscale PNG of zeros: tiny on disk, width x height bytes once decoded
    (Pillow keeps one byte per pixel)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte, then 8 pixels per byte
    comp = zlib.compressobj(9)
    parts = [comp.compress(row * 1000) for _ in range(height // 1000)]
    parts += [comp.compress(row * (height % 1000)), comp.flush()]
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", b"".join(parts))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_in_pil_fails_alone_with_the_bound_scope(tmp_path):
    pytest.importorskip("PIL")
    # GIVEN a 30000 x 30000 image (900 MB decoded) in a file of about 100 KiB
    bomb = bomb_png(30000, 30000)
    assert len(bomb) < 128 * 1024
    (tmp_path / "bomb.png").write_bytes(bomb)
    # AND a policy that binds Pillow to a 256 MiB scope in raise mode
    policy = """
        version = 1
        [scopes.images]
        on_oom = "raise"
        budget = "256 MiB"
        modules = ["PIL.*"]
        """
    # AND an application that knows nothing about that scope
    code = """
        import allocpolicy
        from allocpolicy import _native
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None  # Pillow's own guard would refuse first
        try:
            with Image.open("bomb.png") as im:
                print("opened", im.size)
                im.load()
            print("decoded")
        except allocpolicy.AllocError as err:
            print("refused", err.scope, err.reason, err.budget, err.task)
        print("depth", _native.runtime().current()[1])
        # Outside Pillow the program is unbounded and goes on:
        big = bytearray(512 << 20)
        print("outside", len(big))
        # and Pillow still decodes what fits its budget.
        small = Image.new("L", (2000, 2000), 7)
        print("small", small.getpixel((1999, 1999)))
        """
    assert "images" not in code
    # WHEN it runs under the runtime with that policy
    out = check(run_python(code, policy, tmp_path))
    # THEN decoding the bomb fails with AllocError naming the bound scope
    lines = out.splitlines()
    assert lines[0] == "opened (30000, 30000)"
    assert lines[1] == f"refused images budget {256 << 20} images"
    # AND the thread is out of the scope, and the rest of the program goes on
    assert lines[2:] == ["depth 0", f"outside {512 << 20}", "small 7"]


def test_deep_alternating_calls_stay_in_one_instance_and_leave_it(tmp_path):
    # GIVEN bound functions calling each other 300 deep: more activations of
    # different functions than a thread keeps records of (64, on 3.12+)
    code = """
        import allocpolicy, sys
        import mylib
        from allocpolicy import _native
        rt = _native.runtime()
        sys.setrecursionlimit(5000)
        before = allocpolicy.stats().scopes["wor" + "k"].instances
        # WHEN the innermost call reports where it is, and then allocates too much
        print("depth", mylib.ping(300, mylib.where))
        print("instances", allocpolicy.stats().scopes["wor" + "k"].instances - before)
        try:
            mylib.ping(301, lambda: mylib.big(64 << 20))
        except allocpolicy.AllocError as err:
            print("refused", err.reason)
        # THEN the thread is outside the scope again after each
        print("after", rt.current()[1])
        print("again", mylib.ping(3, mylib.where), rt.current()[1])
        """
    out = check(run_with_mylib(code, work_policy(), tmp_path))
    # every call ran in the one instance the outermost entered; the refusal
    # at the bottom left as AllocError from the outermost bound frame
    assert out.splitlines() == ["depth 1", "instances 1", "refused budget", "after 0", "again 1 0"], out


# --- What is bound ------------------------------------------------------------------


def test_module_imported_after_the_policy_is_applied(tmp_path):
    out = check(
        run_with_mylib(
            """
            import sys, allocpolicy
            from allocpolicy import _native
            assert "mylib" not in sys.modules
            import mylib
            print("import", mylib.IMPORT_DEPTH)
            print("call", mylib.where())
            print("outside", _native.runtime().current()[1])
            try:
                mylib.big(64 << 20)
            except allocpolicy.AllocError as err:
                print("refused", err.reason, err.budget, err.limit)
            bound = [name for name, s in allocpolicy.stats().scopes.items() if s.violations]
            print("violations in", bound)
            """,
            work_policy(),
            tmp_path,
        )
    )
    assert out.splitlines() == [
        "import 0",
        "call 1",
        "outside 0",
        f"refused budget {16 << 20} budget",
        "violations in ['work']",
    ]


def test_module_imported_before_configure_and_bindings_replaced(tmp_path):
    # Under the built-in policy; the program binds modules itself, after the
    # module was imported, then replaces and removes the binding.
    (tmp_path / "mylib.py").write_text(MYLIB)
    out = check(
        run_python(
            """
            import allocpolicy
            import mylib

            def instances(name):
                return allocpolicy.stats().scopes[name].instances

            print("unbound", mylib.where())
            allocpolicy.configure({"scopes": {"a": {"modules": ["mylib"]}, "b": {}}})
            a, b = instances("a"), instances("b")
            print("bound to a", mylib.where(), instances("a") - a, instances("b") - b)
            allocpolicy.configure({"scopes": {"a": {}, "b": {"modules": ["mylib"]}}})
            a, b = instances("a"), instances("b")
            print("bound to b", mylib.where(), instances("a") - a, instances("b") - b)
            allocpolicy.configure({"scopes": {"a": {}, "b": {}}})
            print("unbound again", mylib.where())
            """,
            None,
            tmp_path,
        )
    )
    assert out.splitlines() == ["unbound 0", "bound to a 1 1 0", "bound to b 1 0 1", "unbound again 0"]


def test_an_unbound_module_with_the_same_code_stays_unbound(tmp_path):
    # Code objects compare equal by content: binding must go by identity.
    (tmp_path / "twin.py").write_text(MYLIB)
    out = check(
        run_with_mylib(
            """
            import mylib, twin
            # the bound module's code first, so that its code objects are known
            print(mylib.where(), twin.where(), mylib.rec(3), twin.rec(3))
            """,
            work_policy(),
            tmp_path,
        )
    )
    assert out.split() == ["1", "0", "1", "0"]


def test_methods_static_and_class_methods_and_properties_are_bound(tmp_path):
    out = check(
        run_with_mylib(
            """
            import mylib
            t = mylib.Thing()
            print(t.method(), mylib.Thing.static(), mylib.Thing.klass(), t.prop)
            """,
            work_policy(),
            tmp_path,
        )
    )
    assert out.split() == ["1", "1", "1", "1"]


def test_threads_enter_their_own_instances(tmp_path):
    out = check(
        run_with_mylib(
            """
            import threading, allocpolicy, mylib
            from allocpolicy._modules import bound_scope
            scope = bound_scope("mylib")
            depths = []
            gate = threading.Barrier(2)
            def worker():
                gate.wait()
                depths.append(mylib.call(lambda: (gate.wait(), mylib.where())[1]))
            threads = [threading.Thread(target=worker) for _ in range(2)]
            n = allocpolicy.stats().scopes[scope].instances
            for t in threads: t.start()
            for t in threads: t.join()
            after = allocpolicy.stats().scopes[scope].instances
            print(depths, after - n)
            """,
            work_policy(),
            tmp_path,
        )
    )
    # Both threads were inside at once (the barrier), each in an instance of its own.
    assert out.strip() == "[1, 1] 2"


# --- Only the outermost entry enters ----------------------------------------------


def test_recursion_and_reentry_do_not_nest_instances(tmp_path):
    out = check(
        run_with_mylib(
            """
            import allocpolicy, mylib
            from allocpolicy._modules import bound_scope
            scope = bound_scope("mylib")
            def instances():
                return allocpolicy.stats().scopes[scope].instances
            n = instances()
            print("recursion", mylib.rec(25), instances() - n)
            n = instances()
            # bound code -> unbound callback -> bound code again: still one instance
            print("reentry", mylib.call(lambda: mylib.call(mylib.where)), instances() - n)
            n = instances()
            print("three calls", mylib.where(), mylib.where(), mylib.where(), instances() - n)
            """,
            work_policy(),
            tmp_path,
        )
    )
    assert out.splitlines() == ["recursion 1 1", "reentry 1 1", "three calls 1 1 1 3"]


# --- Generators and coroutines ------------------------------------------------------


def test_generators_leave_the_scope_while_suspended(tmp_path):
    out = check(
        run_with_mylib(
            """
            import allocpolicy, mylib
            from allocpolicy import _native
            rt = _native.runtime()
            from allocpolicy._modules import bound_scope
            scope = bound_scope("mylib")
            n = allocpolicy.stats().scopes[scope].instances
            g = mylib.gen(3)
            steps = []
            for depth in g:
                steps.append((depth, rt.current()[1]))  # inside the step, then here between steps
            print("steps", steps)
            # each resumption from unbound code is an instance of its own
            print("instances", allocpolicy.stats().scopes[scope].instances - n)
            # consumed inside bound code, the generator runs in the caller's instance
            print("inside", mylib.consume())
            g = mylib.gen(5)
            next(g)
            g.close()
            print("closed", rt.current()[1])
            """,
            work_policy(),
            tmp_path,
        )
    )
    assert out.splitlines() == [
        "steps [(1, 0), (1, 0), (1, 0)]",
        "instances 4",  # three steps and the final resumption that finishes it
        "inside [1, 1, 1, 1]",
        "closed 0",
    ]


def test_coroutines_leave_the_scope_at_every_await(tmp_path):
    out = check(
        run_with_mylib(
            """
            import asyncio, mylib
            from allocpolicy import _native
            rt = _native.runtime()
            log = []
            async def unbound():
                for _ in range(3):
                    log.append(("other", rt.current()[1]))
                    await asyncio.sleep(0)
            async def main():
                result, _ = await asyncio.gather(mylib.acoro(log), unbound())
                return result
            print(asyncio.run(main()))
            print(sorted(set(log)))
            """,
            work_policy(),
            tmp_path,
        )
    )
    # The other task, interleaved with the bound one, never runs in its scope.
    assert out.splitlines() == ["1", "[('bound', 1), ('other', 0)]"]


def test_async_generators_are_bound_where_sys_monitoring_exists(tmp_path):
    out = check(
        run_with_mylib(
            """
            import asyncio, mylib
            from allocpolicy import _native
            async def main():
                return [(d, _native.runtime().current()[1]) async for d in mylib.agen(2)]
            print(asyncio.run(main()))
            """,
            work_policy(),
            tmp_path,
        )
    )
    # 3.11 wraps no async generator function (docs/binding.rst): its body runs
    # in the scope only when iterated from bound code.
    inside = 1 if sys.version_info >= (3, 12) else 0
    assert out.strip() == f"[({inside}, 0), ({inside}, 0)]"


# --- Exceptions -------------------------------------------------------------------------


def test_exceptions_unwind_the_scope(tmp_path):
    out = check(
        run_with_mylib(
            """
            import allocpolicy, mylib
            from allocpolicy import _native
            rt = _native.runtime()
            try:
                mylib.fail(5)
            except ValueError as err:
                print("ValueError", err, rt.current()[1])
            try:
                mylib.out_of_memory()
            except allocpolicy.AllocError:
                print("wrongly converted")
            except MemoryError as err:
                # not caused by the runtime: stays what it is
                print("MemoryError", err, rt.current()[1])
            print("still bound", mylib.where())
            """,
            work_policy(),
            tmp_path,
        )
    )
    assert out.splitlines() == [
        "ValueError bad input 0",
        "MemoryError not the runtime's 0",
        "still bound 1",
    ]


def test_refused_allocation_surfaces_as_alloc_error_with_the_module_traceback(tmp_path):
    out = check(
        run_with_mylib(
            """
            import traceback, allocpolicy, mylib
            from allocpolicy import _native
            try:
                mylib.call(lambda: mylib.big(64 << 20))
            except allocpolicy.AllocError as err:
                print(type(err).__name__, err.reason, err.size, err.budget, err.limit)
                print("scope is task", err.scope == err.task)
                frames = [f.name for f in traceback.extract_tb(err.__traceback__)]
                print("frames", "big" in frames, "call" in frames)
            print("depth", _native.runtime().current()[1])
            print("outside", len(bytearray(64 << 20)))
            """,
            work_policy(),
            tmp_path,
        )
    )
    assert out.splitlines() == [
        f"AllocError budget {(64 << 20) + 1} {16 << 20} budget",
        "scope is task True",
        "frames True True",
        "depth 0",
        f"outside {64 << 20}",
    ]


# --- Together with explicit scopes ----------------------------------------------------

NESTED = """
version = 1
[scopes.request]
on_oom = "{outer}"
budget = "32 MiB"
[scopes.work]
on_oom = "{inner}"
budget = "1 GiB"
modules = ["mylib"]
"""


def test_enclosing_task_budget_applies_inside_bound_code(tmp_path):
    out = check(
        run_with_mylib(
            """
            import allocpolicy, mylib
            from allocpolicy import _native
            try:
                with allocpolicy.task("request"):
                    print("depth inside", mylib.where())
                    mylib.big(64 << 20)
            except allocpolicy.AllocError as err:
                # the request's budget refused, in the bound scope's raise mode;
                # the bound scope converted it, the task let it through
                print(err.scope, err.limit, err.budget, err.task == err.scope)
            print("depth", _native.runtime().current()[1])
            """,
            NESTED.format(outer="raise", inner="raise"),
            tmp_path,
        )
    )
    assert out.splitlines() == ["depth inside 2", f"request budget {32 << 20} False", "depth 0"]


def test_bound_scope_mode_decides_abort_inside_a_raise_task(tmp_path):
    proc = run_with_mylib(
        """
        import allocpolicy, mylib
        with allocpolicy.task("request"):
            mylib.big(64 << 20)
        print("not reached")
        """,
        NESTED.format(outer="raise", inner="abort"),
        tmp_path,
    )
    assert proc.returncode == -signal.SIGABRT, proc.stderr
    assert "not reached" not in proc.stdout
    assert "allocpolicy: allocation refused in scope 'work'" in proc.stderr
    assert f"budget of scope 'request'={32 << 20}" in proc.stderr
    assert "in big" in proc.stderr  # faulthandler's traceback shows the bound function


def test_bound_scope_mode_decides_raise_inside_an_abort_scope(tmp_path):
    out = check(
        run_with_mylib(
            """
            import allocpolicy, mylib
            with allocpolicy.scope("request"):
                try:
                    mylib.big(64 << 20)
                except allocpolicy.AllocError as err:
                    print("raised", err.scope)
            print("alive")
            """,
            NESTED.format(outer="abort", inner="raise"),
            tmp_path,
        )
    )
    assert out.splitlines() == ["raised request", "alive"]
