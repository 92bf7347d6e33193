"""Where a refusal was made in Python code, and whether an exception was raised there.

At each refusal the runtime notes the code object and the instruction that the
thread's current Python frame was running (``py_code`` and ``py_instr`` of
the violation record; ``native/src/pyframe.c``). CPython raises the refusal's
exception right there: the innermost entry of the exception's traceback names
that code object and that instruction. A boundary compares the two
(:func:`raised_at`), so that it reports as AllocError the exception the
refusal caused (or one raised while handling it), and never a later one that
C code raised for another reason after the program caught the refusal and
went on: ``bytearray(sys.maxsize)`` (a MemoryError CPython raises without
asking for memory), a ``KeyError``.

The library has no ``Python.h``, so this module tells it where the running
interpreter keeps a thread's current frame: the layouts of the CPython
versions below, checked against a frame whose code and instruction are known
(:func:`enable`) before the runtime relies on them. On other interpreters and
builds the records carry no place, and the boundary falls back on how the
exception was raised (``refusal._carries``).
"""

from __future__ import annotations

import ctypes
import opcode
import sys

from .. import _native

__all__ = ["enable", "raised_at"]

# (offset in the thread state of the pointer to what holds the current frame,
# or -1 when the thread state holds it; offset of the current frame there;
# offsets of the code object and of the instruction pointer in a frame), for
# the release builds of each version (64-bit; no debug or free-threaded ABI).
_LAYOUTS = {
    (3, 11): (56, 8, 32, 56),  # tstate->cframe->current_frame; f_code, prev_instr
    (3, 12): (56, 0, 0, 56),  # tstate->cframe->current_frame; f_code, prev_instr
    (3, 13): (-1, 72, 0, 56),  # tstate->current_frame; f_executable, instr_ptr
}

# py_instr - py_code - tb_lasti for an exception raised where the refusal was
# made: where the bytecode starts in a code object (from enable()).
_start: int | None = None


def _layout() -> tuple[int, int, int, int] | None:
    if (
        sys.implementation.name != "cpython"
        or getattr(sys, "abiflags", "x")
        or ctypes.sizeof(ctypes.c_void_p) != 8
    ):
        return None
    return _LAYOUTS.get(sys.version_info[:2])


def _here(read, probe, code, instr) -> None:
    # The one call here is the instruction whose place the runtime reads.
    read(probe, code, instr)


def _call_offset(code) -> int | None:
    """Offset of the single CALL instruction in ``code``."""
    ops = code.co_code
    calls = [at for at in range(0, len(ops), 2) if ops[at] == opcode.opmap["CALL"]]
    return calls[0] if len(calls) == 1 else None


def enable(rt: _native.Runtime) -> bool:
    """Have ``rt`` note where each refusal is made, if this interpreter's
    layout is known and reads right here; whether it does."""
    global _start
    layout = _layout()
    if layout is None:
        return False
    thread_state = ctypes.pythonapi.PyGILState_GetThisThreadState
    thread_state.restype = ctypes.c_void_p
    holder, current = layout[0], layout[1]
    if holder < 0:
        # The thread state holds the current frame itself: it must be this
        # function's (a frame object's f_frame, after its header and f_back),
        # before the runtime reads anything through it. (A holder elsewhere
        # is checked by the runtime: see pyframe.c.)
        ours = ctypes.c_void_p.from_address(id(sys._getframe()) + 3 * ctypes.sizeof(ctypes.c_void_p))
        if ctypes.c_void_p.from_address(thread_state() + current).value != ours.value:
            return False
    probe = _native.FrameProbeC(ctypes.sizeof(_native.FrameProbeC), *layout)
    probe.thread_state = ctypes.cast(thread_state, ctypes.c_void_p).value
    code, instr = ctypes.c_uint64(), ctypes.c_uint64()
    _here(rt.frame_reader(), ctypes.byref(probe), ctypes.byref(code), ctypes.byref(instr))
    at = _call_offset(_here.__code__)
    start = instr.value - code.value - at if at is not None else -1
    # The frame read must be _here's, stopped at its call.
    if code.value != id(_here.__code__) or not 0 < start < 4096:
        return False
    _start = start
    rt.set_frame_probe(probe)
    return True


def raised_at(exc: BaseException, v: _native.Violation) -> bool | None:
    """Whether ``exc``, or an exception it chains to (``__cause__``, else
    ``__context__``: raised while handling it), was raised where the refusal
    ``v`` was made; ``None`` when the record does not say where that was."""
    if not v.py_code or _start is None:
        return None
    lasti = v.py_instr - v.py_code - _start
    seen = 0
    while exc is not None and seen < 32:
        seen += 1
        tb = exc.__traceback__
        if tb is not None:
            while tb.tb_next is not None:
                tb = tb.tb_next
            if tb.tb_lasti == lasti and id(tb.tb_frame.f_code) == v.py_code:
                return True
        exc = exc.__cause__ if exc.__cause__ is not None else exc.__context__
    return False
