"""Locks that a forked child can take.

A lock held by another thread when the process forks is copied held into the
child, where that thread does not exist, so the child's first call that needs
it waits for ever. The package's locks are held across calls into the runtime
(``configure()``, ``inject()``, loading the library), and a ctypes call lets
other threads run, fork included; so every lock of the package is made here,
and a forked child re-initialises them all before it runs any code.

What such a lock guards is as the other thread left it: the runtime's native
state is whole (``ap_configure`` makes the fork wait for it), while the
package's own record of it may lag behind in the child until its next
``configure()``. The standard library resets its own locks the same way
(``threading``, ``logging``, ``concurrent.futures``).

Imported when every interpreter under the runtime starts: ``os`` and
``_thread`` only.
"""

from __future__ import annotations

import os
import _thread

__all__ = ["lock", "rlock"]

_locks: list = []


def lock() -> _thread.LockType:
    """A new lock, released again in a forked child."""
    made = _thread.allocate_lock()
    _locks.append(made)
    return made


def rlock() -> _thread.RLock:
    """A new reentrant lock, released again in a forked child."""
    made = _thread.RLock()
    _locks.append(made)
    return made


def _reinit_in_child() -> None:
    for made in _locks:
        made._at_fork_reinit()


os.register_at_fork(after_in_child=_reinit_in_child)
