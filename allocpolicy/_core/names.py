"""Scope names and their runtime ids, and the warning for a process the runtime does not govern."""

from __future__ import annotations

import os
import sys
import warnings

from .. import _native
from .._errors import AllocPolicyWarning, UnknownScopeError

__all__ = ["scope_ids", "scope_id", "scope_name", "declared_scopes", "warn_inactive"]

# Ids never change once the runtime assigned them (scopes are never removed),
# so both directions are cached for the life of the process.
_scope_ids: dict[str, int] = {}
#: The cache of scope_id(), by name; read-only outside this module (a scope's
#: entry looks its id up here before calling anything).
scope_ids = _scope_ids
_scope_names: dict[int, str] = {}
_warned_inactive = False


def scope_id(rt: _native.Runtime, name: str) -> int:
    """Runtime id of the scope ``name``; :class:`UnknownScopeError` if the
    runtime's policy does not declare it (``"process"`` is not entered by name)."""
    try:
        return _scope_ids[name]
    except KeyError:
        pass
    sid = rt.scope_id(name)
    if sid is None or sid == 0:
        raise UnknownScopeError(name, declared_scopes(rt))
    _scope_ids[name] = sid
    _scope_names[sid] = name
    return sid


def scope_name(rt: _native.Runtime, sid: int) -> str:
    """Name of the scope with runtime id ``sid`` (``"#sid"`` if the runtime has none)."""
    try:
        return _scope_names[sid]
    except KeyError:
        pass
    st = rt.scope_stats(sid)
    name = st.name.decode("utf-8", "replace") if st is not None else f"#{sid}"
    _scope_names[sid] = name
    return name


def declared_scopes(rt: _native.Runtime) -> list[str]:
    """Every scope the runtime knows, except the process scope: those that
    can be entered (a later policy that leaves one out does not remove it)."""
    return [scope_name(rt, sid) for sid in range(1, rt.process_stats().scopes)]


def warn_inactive() -> None:
    """Warn, once per process, that scopes and budgets are not enforced here."""
    global _warned_inactive
    if not _warned_inactive:
        _warned_inactive = True
        warnings.warn(
            "the allocpolicy runtime is not preloaded in this process, so scopes and budgets "
            "are not enforced; start the program with `allocpolicy run -- ...`",
            AllocPolicyWarning,
            stacklevel=_outside_the_package(),
        )


#: Directory of the allocpolicy package, with a trailing separator.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _outside_the_package() -> int:
    """``stacklevel`` for a warning issued by the caller that names the first
    frame outside the package, however deep inside it the call came from
    (``reserve`` reaches ``warn_inactive`` through one more function than ``scope``)."""
    frame = sys._getframe(2)  # the caller of warn_inactive
    level = 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level
