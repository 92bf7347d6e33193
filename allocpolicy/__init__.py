"""allocpolicy: per-scope out-of-memory policy for Python processes.

Run a program under the runtime with ``allocpolicy run -- python app.py``, then::

    import allocpolicy

    try:
        with allocpolicy.task("request"):
            handle(request)
    except allocpolicy.AllocError as err:
        log.warning("request dropped: %s", err)   # the process goes on

PYTEST_DONT_REWRITE: under ``allocpolicy run`` this package is imported when
the interpreter starts, before pytest can rewrite the asserts of the package
its plugin comes from; the marker tells pytest not to try (nor to warn).
"""

import faulthandler as _faulthandler
import importlib as _importlib
import os as _os
import warnings as _warnings

from . import _native
from ._core import postimport as _postimport
from ._core import refusal_sites as _refusal_sites
from ._errors import (
    AllocError,
    AllocPolicyError,
    AllocPolicyWarning,
    PolicyError,
    PolicyProblem,
    RuntimeLoadError,
    ScopeCapacityError,
    ScopeMismatchError,
    UnknownScopeError,
)
from ._native import library_path

__version__ = "0.1.0"

__all__ = [
    "AllocError",
    "AllocPolicyError",
    "AllocPolicyWarning",
    "InjectSettings",
    "InjectStats",
    "Policy",
    "PolicyError",
    "PolicyProblem",
    "ProcessPolicy",
    "ProcessStats",
    "RegionStats",
    "Reservation",
    "RuntimeLoadError",
    "ScopeCapacityError",
    "ScopeMismatchError",
    "ScopePolicy",
    "ScopeStats",
    "Stats",
    "UnknownScopeError",
    "Unstored",
    "active_policy",
    "bind",
    "configure",
    "count_allocs",
    "default_policy",
    "inject",
    "inject_stats",
    "install",
    "is_active",
    "is_installed",
    "library_path",
    "load_policy",
    "machine_headroom",
    "no_alloc",
    "on_refusal",
    "remove_refusal_hook",
    "replay_setting",
    "reserve",
    "scope",
    "serve_stats",
    "stats",
    "task",
    "try_append",
    "try_bytearray",
    "try_bytes_join",
    "try_extend",
    "try_insert",
    "try_reserve",
    "uninstall",
]

# Every interpreter started under `allocpolicy run` imports this package (see
# _startup.pth), so only what activation needs is imported eagerly; the rest
# (policy parsing, dataclasses, pathlib) loads on first use.
_LAZY = {
    "active_policy": "_config",
    "configure": "_configure",
    "is_active": "_config",
    "install": "_inprocess",
    "is_installed": "_inprocess",
    "uninstall": "_inprocess",
    "Policy": "_policy",
    "ProcessPolicy": "_policy",
    "ScopePolicy": "_policy",
    "default_policy": "_policy",
    "load_policy": "_policy",
    "Reservation": "_fallible",
    "Unstored": "_fallible",
    "machine_headroom": "_machine",
    "reserve": "_fallible",
    "try_append": "_fallible",
    "try_bytearray": "_fallible",
    "try_bytes_join": "_fallible",
    "try_extend": "_fallible",
    "try_insert": "_fallible",
    "try_reserve": "_fallible",
    "RegionStats": "_regions",
    "count_allocs": "_regions",
    "no_alloc": "_regions",
    "bind": "_scope",
    "scope": "_scope",
    "task": "_scope",
    "ProcessStats": "_stats",
    "ScopeStats": "_stats",
    "Stats": "_stats",
    "stats": "_stats",
    "serve_stats": "_stats_socket",
    "on_refusal": "_core.refusal_hooks",
    "remove_refusal_hook": "_core.refusal_hooks",
    "InjectSettings": "_inject_settings",
    "InjectStats": "_inject",
    "inject": "_inject",
    "inject_stats": "_inject",
    "replay_setting": "_inject",
}


def __getattr__(name):
    try:
        module = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


def _activate() -> None:
    """Under a preloaded runtime: put the policy handed over in force, count
    Python's small objects and make sure an abort diagnostic is followed by
    the Python traceback, on the same fd."""
    rt = _native.runtime()
    if rt is None:
        return
    table = _os.environ.get("ALLOCPOLICY_TABLE")
    if table:
        # The library parsed this table before Python started, and had no
        # way to complain if it was malformed (set by hand): check it here.
        try:
            rt.configure(table)
        except RuntimeLoadError as err:
            _warnings.warn(
                f"ALLOCPOLICY_TABLE is malformed and was ignored, so no budgets apply: {err}",
                AllocPolicyWarning,
                stacklevel=2,
            )
    else:
        # A bare LD_PRELOAD (a container entry point, a systemd unit): the
        # library knows no policy, so Python applies the one ALLOCPOLICY_POLICY
        # names, or the built-in default, before the program runs.
        from . import _configure

        _configure.start(rt)
    if _os.environ.get("ALLOCPOLICY_INJECT"):
        # After the table: the setting may name a scope it declares.
        from . import _inject

        _inject.activate_from_environment(rt)
    rt.install_arena_hook()
    # Every refusal from here on notes where the Python code was, which is
    # how a task boundary tells the refusal's exception from a later one.
    _refusal_sites.enable(rt)
    if table and ";libreport=" in table:
        # Under `allocpolicy libs`: name the libraries loaded that end the
        # process on a refusal, before the report.
        from . import _offenders

        _offenders.warn_at_exit(rt, table)
    # Scopes entered in coroutines follow their task: the event loops are
    # followed from the moment asyncio is imported (_loops.follow() does the
    # same, without importing _loops at every start).
    _postimport.after_import("asyncio.base_events", "allocpolicy._loops:follow_asyncio")
    if not _faulthandler.is_enabled():
        _faulthandler.enable(file=rt.process_stats().report_fd, all_threads=True)
    text = _os.environ.get("ALLOCPOLICY_POLICY_TOML")
    source = _os.environ.get("ALLOCPOLICY_POLICY", "")
    if table and (text is not None or source[:1] not in ("", "<")):
        # A policy file may bind scopes to modules, which must hold before the
        # program imports them; the built-in policy binds none.
        from . import _modules

        _modules.activate_from_environment(text)
    if _os.environ.get("ALLOCPOLICY_STATS_SOCKET"):
        # Asked for (`run --stats-socket`): only then is there a thread.
        from . import _stats_socket

        _stats_socket.start_from_environment()


_activate()
