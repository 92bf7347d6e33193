"""allocpolicy: per-scope out-of-memory policy for Python processes.

Run a program under the runtime with ``allocpolicy run -- python app.py``, then::

    import allocpolicy

    try:
        with allocpolicy.task("request"):
            handle(request)
    except allocpolicy.AllocError as err:
        log.warning("request dropped: %s", err)   # the process goes on
"""


import faulthandler as _faulthandler

from . import _native
from ._config import AllocPolicyWarning, active_policy, configure, is_active
from ._errors import (
    AllocError,
    AllocPolicyError,
    PolicyError,
    PolicyProblem,
    RuntimeLoadError,
    UnknownScopeError,
)
from ._native import library_path
from ._policy import Policy, ProcessPolicy, ScopePolicy, default_policy, load_policy
from ._scope import bind, scope, task
from ._stats import ProcessStats, ScopeStats, Stats, stats

__version__ = "0.1.0"

__all__ = [
    "AllocError",
    "AllocPolicyError",
    "AllocPolicyWarning",
    "Policy",
    "PolicyError",
    "PolicyProblem",
    "ProcessPolicy",
    "ProcessStats",
    "RuntimeLoadError",
    "ScopePolicy",
    "ScopeStats",
    "Stats",
    "UnknownScopeError",
    "active_policy",
    "bind",
    "configure",
    "default_policy",
    "is_active",
    "library_path",
    "load_policy",
    "scope",
    "stats",
    "task",
]


def _activate() -> None:
    """Under a preloaded runtime: count Python's small objects and make sure an
    abort diagnostic is followed by the Python traceback."""
    rt = _native.runtime()
    if rt is None:
        return
    rt.install_arena_hook()
    if not _faulthandler.is_enabled():
        _faulthandler.enable(file=active_policy().process.report_fd, all_threads=True)


_activate()
