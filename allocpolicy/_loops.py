"""Following the event loops: every task steps in its own scope instances.

Whatever creates the loop (``asyncio.run``, ``asyncio.Runner``,
``new_event_loop``, a policy, ``uvloop.run``, a server), its tasks are made by
its ``create_task`` method: ``asyncio.create_task``, ``ensure_future``,
``gather``, ``TaskGroup``, anyio's task groups and ``run_until_complete`` all go
through it, and a task factory set on the loop is called from it. So the
method is wrapped on the loop classes themselves, once, as soon as their
module is imported (``_core/postimport.py``): loops created before that are covered
too, a task factory set later keeps working (it receives the stepper), and a
loop that is idle pays nothing.

Work handed to threads carries the running context's instance as
:func:`~allocpolicy.bind` would: ``loop.run_in_executor`` (and so
``asyncio.to_thread``) for thread pools, and ``anyio.to_thread.run_sync`` (and
so Starlette's ``run_in_threadpool``), which run the function in a copy of the
context but on a thread whose native scope stack knows nothing of it.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Coroutine

from ._core import postimport, stepping
from ._core.instances import InstanceHandle
from ._scope import bind_handle

__all__ = ["follow", "follow_anyio", "follow_asyncio", "follow_uvloop", "carry"]

_ORIGINAL = "__allocpolicy_original__"


def follow() -> None:
    """Follow every loop, from the moment asyncio is imported (now or later).

    Only asyncio's own import is waited for at first: uvloop and anyio import
    it before they can run anything, and are waited for from then on.
    """
    postimport.after_import("asyncio.base_events", f"{__name__}:follow_asyncio")


def carry(func):
    """``func`` bound to the running context's innermost scope instance, for
    another thread; ``func`` itself outside scopes."""
    frame = stepping.current()
    if frame is None:
        return func
    return bind_handle(func, InstanceHandle.hold(frame.rt, frame.instance))


def _wrap(owner: object, name: str, make) -> None:
    """Replace ``owner.name`` (a class's method, a module's function) with
    ``make(original)``, once."""
    original = getattr(owner, name)
    if getattr(original, _ORIGINAL, None) is not None:
        return  # already wrapped
    wrapper = functools.wraps(original)(make(original))
    setattr(wrapper, _ORIGINAL, original)
    setattr(owner, name, wrapper)


def _stepping_create_task(original):
    stepper_for = stepping.stepper_for
    stepper = stepping.TaskStepper
    native = types.CoroutineType

    def create_task(self, coro, *args, **kwargs):
        if type(coro) is native or (not isinstance(coro, stepper) and isinstance(coro, Coroutine)):
            coro = stepper_for(coro)
        return original(self, coro, *args, **kwargs)

    return create_task


def _carrying_run_in_executor(original):
    # asyncio imported it: no import of ours at startup.
    ThreadPoolExecutor = sys.modules["concurrent.futures"].ThreadPoolExecutor

    def run_in_executor(self, executor, func, *args):
        # Process pools pickle the function: a bound wrapper cannot go there
        # (and another process has scopes of its own).
        if executor is None or isinstance(executor, ThreadPoolExecutor):
            func = carry(func)
        return original(self, executor, func, *args)

    return run_in_executor


def _follow_loop_class(cls: type) -> None:
    _wrap(cls, "create_task", _stepping_create_task)
    _wrap(cls, "run_in_executor", _carrying_run_in_executor)


def follow_asyncio(base_events: types.ModuleType) -> None:
    stepping.use_asyncio(sys.modules["asyncio.events"]._get_running_loop, sys.modules["asyncio.tasks"].current_task)
    _follow_loop_class(base_events.BaseEventLoop)
    postimport.after_import("uvloop", "allocpolicy._loops:follow_uvloop")
    postimport.after_import("anyio.to_thread", "allocpolicy._loops:follow_anyio")


def follow_uvloop(uvloop: types.ModuleType) -> None:
    # uvloop.Loop is a Python subclass of the compiled loop: the wrappers go
    # on it, in front of the compiled methods.
    _follow_loop_class(uvloop.Loop)


def _carrying_run_sync(original):
    async def run_sync(func, *args, **kwargs):
        return await original(carry(func), *args, **kwargs)

    return run_sync


def follow_anyio(to_thread: types.ModuleType) -> None:
    _wrap(to_thread, "run_sync", _carrying_run_sync)
