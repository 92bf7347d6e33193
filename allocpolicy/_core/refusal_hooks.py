"""The refusal hook: callbacks told about every refusal that reaches a boundary.

Rust's ``std::alloc::set_alloc_error_hook`` for Python: a place to log a
refusal and count it, once, where it becomes an :class:`AllocError`. Kept apart
from the boundaries themselves: the one conversion (:mod:`.refusal`) and the regions
call :func:`notify`, and this module imports nothing but the errors, so it can
sit below both.
"""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

from .._errors import AllocError

__all__ = ["on_refusal", "remove_refusal_hook", "notify"]

Hook = Callable[[AllocError], object]
H = TypeVar("H", bound=Hook)

# Replaced, never mutated: `notify` may run in any thread while another
# registers, and reading one tuple needs no lock.
_hooks: tuple[Hook, ...] = ()


def on_refusal(callback: H) -> H:
    """Call ``callback(err)`` for every refused allocation that the program sees as an :class:`AllocError`.

    ``err`` is the :class:`AllocError` about to be raised, with its facts
    (``scope``, ``size``, ``budget``, ``live``, ``reason``, ``limit``, ``task``,
    ...). The callback runs in the thread of the refusal, where the error is
    raised in place of the ``MemoryError`` (a :func:`task` boundary, a
    :func:`bind` wrapper, a module-bound scope, the end of a ``forbid`` scope
    or a :func:`no_alloc` region, a reservation overdraft), before it
    propagates; once per refusal, by the innermost place that converts it. A
    task boundary has left its scope instance by then, so the callback's own
    allocations are not charged to the exhausted budget. Use it for logging
    and metrics; it cannot stop the error. What the fallible API returns or
    raises up front (:func:`reserve`, :func:`try_reserve`, ``try_*``) is the
    caller's to handle and is not reported, nor are ``abort`` scopes, which
    end the process.

    An exception raised by the callback never replaces the refusal: it is
    printed to standard error (``allocpolicy: exception ignored in on_refusal
    callback ...`` and its traceback) and the :class:`AllocError` propagates.
    Callbacks run in the order they were registered; registering one twice
    calls it twice. Returns ``callback``, so that it can be used as a decorator.

    Raises:
        TypeError: ``callback`` is not callable.
    """
    global _hooks
    if not callable(callback):
        raise TypeError(f"on_refusal(): argument 'callback' must be callable, not {type(callback).__name__}")
    _hooks = (*_hooks, callback)
    return callback


def remove_refusal_hook(callback: Hook) -> bool:
    """Unregister ``callback`` (its latest registration); False if it was not registered."""
    global _hooks
    hooks = list(_hooks)
    for i in range(len(hooks) - 1, -1, -1):
        if hooks[i] == callback:
            del hooks[i]
            _hooks = tuple(hooks)
            return True
    return False


def notify(err: AllocError) -> None:
    """Tell every registered callback about ``err``; never raises an ``Exception``."""
    if not _hooks:
        return
    # The boundary runs while the refused allocation's MemoryError is being
    # handled; that one is the program's to see, not part of a hook's report.
    handling = sys.exc_info()[1]
    for hook in _hooks:
        try:
            hook(err)
        except Exception as exc:
            _report(hook, exc, handling)
    handling = None


def _report(hook: Hook, exc: Exception, handling: BaseException | None) -> None:
    # Like the interpreter's "Exception ignored in": the refusal stays the
    # error that propagates, the callback's failure is shown, not lost.
    try:
        import traceback

        name = getattr(hook, "__qualname__", None) or repr(hook)
        print(f"allocpolicy: exception ignored in on_refusal callback {name}:", file=sys.stderr)
        if handling is not None and exc.__context__ is handling:
            exc.__suppress_context__ = True
        traceback.print_exception(exc, file=sys.stderr)
    except Exception:
        pass
    finally:
        exc = handling = None  # no cycle through this frame
