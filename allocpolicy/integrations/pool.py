"""A ``multiprocessing`` pool whose every task runs in its own scope instance::

    from allocpolicy.integrations.pool import ScopedPool

    with ScopedPool(4, scope="task") as pool:
        results = pool.map(handle, jobs)

Every way of handing work to the pool (``apply``, ``apply_async``, ``map``,
``map_async``, ``starmap``, ``starmap_async``, ``imap``, ``imap_unordered``)
runs each call of the function in a new instance of ``scope`` in the worker,
as a task boundary: a refused allocation fails that call with
:class:`allocpolicy.AllocError` (pickled back to the caller), and the worker
process goes on with the next task. Each item of a chunk gets its own instance.
The workers start under the same preload as the parent, so they enforce the
same policy.
"""

from __future__ import annotations

import multiprocessing.pool

from .futures import ScopedCall, _Retries

__all__ = ["ScopedPool", "ScopedCall"]


class ScopedPool(_Retries, multiprocessing.pool.Pool):
    """:class:`multiprocessing.pool.Pool` with the same arguments, plus
    ``scope`` (and ``retries``, ``escalate``: see
    :class:`~allocpolicy.integrations.futures.ScopedCall`); ``context`` picks
    the start method as for ``multiprocessing.get_context(...).Pool``."""

    def __init__(self, processes=None, initializer=None, initargs=(), maxtasksperchild=None,
                 context=None, *, scope: str = "task", retries: int = 0, escalate: float = 2.0) -> None:
        self._set_scope(scope, retries, escalate)
        super().__init__(processes, initializer, initargs, maxtasksperchild, context)

    # apply(), map() and starmap() go through these; starmap's workers call
    # the ScopedCall with each item unpacked, as they would the function.
    def apply_async(self, func, args=(), kwds={}, callback=None, error_callback=None):  # noqa: B006 - Pool's signature
        return super().apply_async(self._scoped(func), args, kwds, callback, error_callback)

    def _map_async(self, func, iterable, mapper, chunksize=None, callback=None, error_callback=None):
        return super()._map_async(self._scoped(func), iterable, mapper, chunksize, callback, error_callback)

    def imap(self, func, iterable, chunksize=1):
        return super().imap(self._scoped(func), iterable, chunksize)

    def imap_unordered(self, func, iterable, chunksize=1):
        return super().imap_unordered(self._scoped(func), iterable, chunksize)
