"""The active policy of this process: which one it is, and reading it.

Entering scopes needs only the scope ids (``_core.names``); the policy model
(with TOML parsing, dataclasses and their imports) is loaded when a policy is
read or configured. Every module a program imports adds objects that each full
garbage collection walks, so the scope path keeps its imports small.
:func:`allocpolicy.configure` (``_configure``) changes the active policy
through :func:`put_in_force`.
"""

from __future__ import annotations

import threading
import warnings
from typing import TYPE_CHECKING

from . import _native
from ._errors import AllocPolicyWarning, PolicyError

if TYPE_CHECKING:
    from ._policy import Policy

__all__ = ["active_policy", "is_active", "put_in_force"]


_lock = threading.Lock()
_active: Policy | None = None


def is_active() -> bool:
    """True when the runtime is preloaded and governs this process's allocations."""
    return _native.runtime() is not None


def active_policy() -> Policy:
    """The policy in force: the last one configured, the one handed over by
    ``allocpolicy run``, or the built-in default."""
    global _active
    if _active is None:
        from ._policy import default_policy, policy_from_environment

        with _lock:
            if _active is None:
                try:
                    _active = policy_from_environment() or default_policy()
                except PolicyError as err:
                    # The file changed after `allocpolicy run` compiled it: the
                    # runtime keeps what it was handed; say so, don't fail, and
                    # describe what the runtime really enforces.
                    warnings.warn(
                        f"the policy file named in the environment no longer loads; "
                        f"the runtime keeps the policy it was started with:\n{err}",
                        AllocPolicyWarning,
                        stacklevel=2,
                    )
                    rt = _native.runtime()
                    _active = _policy_from_runtime(rt) if rt else default_policy()
    return _active


def _policy_from_runtime(rt: _native.Runtime) -> Policy:
    """The policy the runtime enforces, read back from its scope table."""
    from ._policy import Policy, ProcessPolicy, ScopePolicy

    proc = rt.process_stats()
    root = rt.scope_stats(0)
    scopes = []
    for sid in range(1, proc.scopes):
        s = rt.scope_stats(sid)
        scopes.append(
            ScopePolicy(
                name=s.name.decode("utf-8"),
                on_oom=_native.MODES[s.mode],
                budget=s.budget or None,
                total_budget=s.total_budget or None,
            )
        )
    process = ProcessPolicy(
        on_oom=_native.MODES[root.mode],
        budget=proc.budget or None,
        grace=proc.grace,
        report_fd=proc.report_fd,
    )
    return Policy(process=process, scopes=scopes, source="<runtime>")


def put_in_force(new: Policy, rt: _native.Runtime | None) -> None:
    """Compile ``new`` into the runtime (when there is one) and make it the
    active policy, as one step: if the runtime rejects it, nothing changed."""
    global _active
    with _lock:
        if rt is not None:
            rt.configure(new.compile())
        _active = new
