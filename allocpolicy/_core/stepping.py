"""Driving a generator or coroutine one step at a time, with something around each step.

A scope's stack is per thread, so a generator or coroutine that should run in
a scope must be in it while it runs and out of it while it is suspended (other
code runs on the thread then). :func:`drive` does for a generator what
``yield from`` does, and :class:`Stepped` the same for a coroutine under
``await``, calling ``enter()`` before each step (the first, each resumption by
``send``/``throw``, and ``close``) and ``leave(token, exc)`` right after it,
with what ``enter`` returned and the exception that ended the step, if any.
``leave`` may raise in place of that exception (a boundary converting it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # collections.abc is not loaded at startup; this module may be
    from collections.abc import Callable, Generator
    from typing import Any

    Enter = Callable[[], Any]
    Leave = Callable[[Any, BaseException | None], None]

__all__ = ["drive", "Stepped"]


def drive(inner, enter: Enter, leave: Leave) -> Generator:
    """``yield from inner``, with ``enter()``/``leave(token, exc)`` around each step."""
    value = None
    error = None
    while True:
        token = enter()
        try:
            if error is None:
                item = inner.send(value)
            else:
                item = inner.throw(error)
        except StopIteration as stop:
            leave(token, None)
            return stop.value
        except BaseException as exc:
            leave(token, exc)
            raise
        finally:
            # Not kept across the suspension: the value or error of one step
            # must not stay alive while other code runs.
            error = value = None
        leave(token, None)
        try:
            value = yield item
        except GeneratorExit:
            token = enter()
            try:
                inner.close()
            except BaseException as exc:
                leave(token, exc)
                raise
            leave(token, None)
            raise
        except BaseException as exc:
            error = exc


class Stepped:
    """An awaitable running each step of the coroutine ``inner`` between
    ``enter()`` and ``leave(token, exc)`` (see :func:`drive`)."""

    __slots__ = ("inner", "enter", "leave")

    def __init__(self, inner, enter: Enter, leave: Leave) -> None:
        self.inner = inner
        self.enter = enter
        self.leave = leave

    def __await__(self):
        return drive(self.inner, self.enter, self.leave)
