"""Run a callback right after a module is imported, now or later.

``after_import("uvloop", "allocpolicy._loops:follow_uvloop")`` calls the named
function with the module as soon as ``uvloop`` has executed, before the
importer (or anyone else) can use it; at once if it is already imported. The
callback is named by a string so that registering it imports nothing: under
``allocpolicy run`` every interpreter registers its hooks at startup.
"""

from __future__ import annotations

import _thread
import importlib
import sys

from .. import _atfork

__all__ = ["after_import", "spec_behind", "wrap_loader", "AfterExec"]

_lock = _atfork.lock()
_pending: dict[str, list[str]] = {}


def _call(target: str, module) -> None:
    where, _, name = target.partition(":")
    getattr(importlib.import_module(where), name)(module)


def after_import(name: str, target: str) -> None:
    """Call ``target`` (``"package.module:function"``) with module ``name``
    once it is imported."""
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__spec__", None) is not None:
        _call(target, module)
        return
    with _lock:
        _pending.setdefault(name, []).append(target)
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)


def spec_behind(finder, name, path, target=None):
    """The spec the finders after ``finder`` on ``sys.meta_path`` give for ``name``."""
    for other in sys.meta_path:
        if other is finder or not hasattr(other, "find_spec"):
            continue
        spec = other.find_spec(name, path, target)
        if spec is not None:
            return spec
    return None


def wrap_loader(spec, then):
    """``spec`` with its loader made to call ``then(module)`` once the module
    has executed (when the loader can be wrapped); returns ``spec``."""
    if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
        spec.loader = AfterExec(spec.loader, then)
    return spec


class AfterExec:
    """A loader that runs another one, then a callback on the new module."""

    def __init__(self, loader, then) -> None:
        self._loader = loader
        self._then = then

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        # The module's loader is its own again, as if we had never been there.
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._then(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder:
    """First on ``sys.meta_path``; answers only for the modules waited for, by
    asking the finders behind it and wrapping the loader they return."""

    def __init__(self) -> None:
        self._busy = _thread._local()

    def find_spec(self, name, path, target=None):
        if name not in _pending or getattr(self._busy, "on", False):
            return None
        self._busy.on = True
        try:
            spec = spec_behind(self, name, path, target)
        finally:
            self._busy.on = False
        return wrap_loader(spec, _imported)

    def invalidate_caches(self) -> None:
        pass


def _imported(module) -> None:
    with _lock:
        targets = _pending.pop(module.__name__, [])
        if not _pending and _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
    for target in targets:
        _call(target, module)


_finder = _Finder()
