"""The runtime's entry and exit calls as Python built-in functions.

A scope's entry and exit, and each step of a task in a scope, call into the
runtime library. Through a ctypes function object such a call costs about
1,400 instructions whatever the C function does: ctypes makes an argument
tuple, prepares libffi's description of the call again, converts each
argument and the result. The library's ``ap_pycall_*`` adapters have
CPython's METH_FASTCALL signature instead; wrapped in a built-in function
object (``PyCFunction_NewEx``, called through ctypes once per function), a
call costs about a tenth of that, and makes no object: arguments arrive in an
array, the adapter reads them, and a status comes back as a small int, which
CPython never allocates. The function objects are made once per loaded
library; nothing here is compiled against Python (see native/src/pycall.c).
"""

from __future__ import annotations

import ctypes
from typing import Any, Callable

__all__ = ["FastCalls"]

# Include/methodobject.h: the calling convention of the adapters.
_METH_FASTCALL = 0x0080


class _PyMethodDef(ctypes.Structure):
    _fields_ = [
        ("ml_name", ctypes.c_char_p),
        ("ml_meth", ctypes.c_void_p),
        ("ml_flags", ctypes.c_int),
        ("ml_doc", ctypes.c_char_p),
    ]


class _PyApiC(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("long_from_long", ctypes.c_void_p),
        ("long_from_long_long", ctypes.c_void_p),
        ("long_as_mask", ctypes.c_void_p),
        ("err_occurred", ctypes.c_void_p),
        ("err_set_string", ctypes.c_void_p),
        ("type_error", ctypes.c_void_p),
        ("incref", ctypes.c_void_p),
        ("decref", ctypes.c_void_p),
        ("call_objargs", ctypes.c_void_p),
        ("none", ctypes.c_void_p),
    ]


# A function object keeps a pointer to its method definition, never a
# reference: the definitions live as long as the process.
_definitions: list[_PyMethodDef] = []


def _address(fn: Any) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


class FastCalls:
    """Makes built-in functions that call the library's ``ap_`` functions
    through its adapters (``make("ap_enter_marked", "s_uo")``)."""

    def __init__(self, gil_handle: ctypes.PyDLL, check: Callable[[int, str], None]) -> None:
        api = ctypes.PyDLL(None)  # our own handle: argtypes set below are ours
        conv = _PyApiC(
            ctypes.sizeof(_PyApiC),
            _address(api.PyLong_FromLong),
            _address(api.PyLong_FromLongLong),
            _address(api.PyLong_AsUnsignedLongMask),
            _address(api.PyErr_Occurred),
            _address(api.PyErr_SetString),
            ctypes.c_void_p.in_dll(api, "PyExc_TypeError").value,
            _address(api.Py_IncRef),
            _address(api.Py_DecRef),
            _address(api.PyObject_CallFunctionObjArgs),
            id(None),
        )
        setup = gil_handle.ap_set_pyapi
        setup.argtypes = [ctypes.POINTER(_PyApiC)]
        setup.restype = ctypes.c_int
        check(setup(ctypes.byref(conv)), "ap_set_pyapi")
        new = api.PyCFunction_NewEx
        new.argtypes = [ctypes.c_void_p, ctypes.py_object, ctypes.c_void_p]
        new.restype = ctypes.py_object
        self._new = new
        self._handle = gil_handle

    def make(self, name: str, adapter: str) -> Callable[..., int]:
        """A built-in function calling ``name`` of the library through the
        adapter ``ap_pycall_<adapter>``, which must match its signature."""
        # `self` of the function object: the address of the function to call.
        return self._function(name, "ap_pycall_" + adapter, _address(getattr(self._handle, name)))

    def fastcall(self, name: str) -> Callable[..., Any]:
        """The library's own METH_FASTCALL function ``name`` as a built-in function."""
        return self._function(name, name, None)

    def _function(self, name: str, meth: str, self_: object) -> Callable[..., Any]:
        definition = _PyMethodDef(
            name.encode("ascii"), _address(getattr(self._handle, meth)), _METH_FASTCALL, None
        )
        _definitions.append(definition)
        return self._new(ctypes.addressof(definition), self_, None)
