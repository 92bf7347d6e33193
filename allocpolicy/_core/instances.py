"""Handles on scope instances: run work in an instance from elsewhere.

A scope instance lives while it is on some thread's scope stack or held.
:class:`InstanceHandle` holds one (so that its id is not reused and its
budget stays in force) and lets any thread, or any step of a task, run inside
it: :meth:`~InstanceHandle.attach` pushes the instance on the calling thread's
scope stack, :meth:`~InstanceHandle.detach` pops it. The hold ends with
:meth:`~InstanceHandle.close`, or when the handle is garbage.
"""

from __future__ import annotations

import weakref

from .. import _native
from .names import scope_name

__all__ = ["InstanceHandle"]


class InstanceHandle:
    """A held scope instance.

    Attributes:
        instance: the runtime's instance id.
        scope: name of the instance's scope.
    """

    __slots__ = ("_rt", "instance", "scope", "_release", "__weakref__")

    def __init__(self, rt: _native.Runtime, instance: int, scope: str) -> None:
        self._rt = rt
        self.instance = instance
        self.scope = scope
        self._release = weakref.finalize(self, rt.release, instance)

    @classmethod
    def current(cls, rt: _native.Runtime) -> InstanceHandle | None:
        """A handle on the calling thread's innermost instance; ``None`` outside
        every scope (the process scope is not held) or if it cannot be held."""
        instance, _ = rt.current()
        return cls.hold(rt, instance)

    @classmethod
    def hold(cls, rt: _native.Runtime, instance: int) -> InstanceHandle | None:
        """A handle on ``instance``; ``None`` for the process scope, or an
        instance that has already ended."""
        if instance == 0 or not rt.hold(instance):
            return None
        return cls(rt, instance, scope_name(rt, rt.instance_stats(instance).scope))

    def attach(self) -> None:
        """Make the instance the calling thread's innermost, until :meth:`detach`.

        Only fails at the thread's nesting capacity (ScopeCapacityError): the
        handle holds the instance, so it is alive.
        """
        self._rt.attach(self.instance)

    def detach(self) -> None:
        """Leave the instance that :meth:`attach` entered on this thread."""
        self._rt.exit()

    def close(self) -> None:
        """Stop holding the instance (idempotent); it ends when no thread is in it."""
        self._release()

    def __repr__(self) -> str:
        state = "held" if self._release.alive else "released"
        return f"<InstanceHandle {self.instance} of scope {self.scope!r}, {state}>"
