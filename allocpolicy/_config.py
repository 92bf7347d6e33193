"""The active policy of this process: which one it is, and reading it.

Entering scopes needs only the scope ids (``_core.names``); the policy model
(with TOML parsing, dataclasses and their imports) is loaded when a policy is
read or configured. Every module a program imports adds objects that each full
garbage collection walks, so the scope path keeps its imports small.
:func:`allocpolicy.configure` (``_configure``) changes the active policy
through :func:`put_in_force`.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

from . import _atfork, _native
from ._core.names import declared_scopes
from ._errors import AllocPolicyWarning, PolicyError

if TYPE_CHECKING:
    from ._policy import Policy

__all__ = ["active_policy", "is_active", "put_in_force"]


_lock = _atfork.lock()
_active: Policy | None = None


def is_active() -> bool:
    """True when the runtime is preloaded and governs this process's allocations."""
    return _native.runtime() is not None


def active_policy() -> Policy:
    """The policy in force: the last one configured, the one handed over by
    ``allocpolicy run`` or named by ``ALLOCPOLICY_POLICY``, or the built-in default."""
    global _active
    if _active is None:
        with _lock:
            if _active is None:
                _active = _starting_policy()
    return _active


def _starting_policy() -> Policy:
    """What holds before anything is configured in this process, read from the
    environment once (a mistake there is one warning, at the first use)."""
    from ._policy import ENV_POLICY, ENV_POLICY_TOML, ENV_TABLE, default_policy, policy_from_environment

    rt = _native.runtime()
    handed_table = rt is not None and bool(os.environ.get(ENV_TABLE))
    try:
        policy = policy_from_environment()
    except PolicyError as err:
        if handed_table:
            consequence = "the runtime keeps the compiled policy it was started with"
        else:
            consequence = "the built-in default policy applies instead"
        warnings.warn(
            f"the policy in the environment ({ENV_POLICY}) does not load; {consequence}:\n{err}",
            AllocPolicyWarning,
            stacklevel=4,
        )
        policy = None
    if policy is not None and handed_table and ENV_POLICY_TOML not in os.environ:
        # Both set by hand: the table is what the runtime enforces, and a file
        # that declares other scopes does not describe it.
        undeclared = sorted(set(policy.scopes) - set(declared_scopes(rt)))
        if undeclared:
            warnings.warn(
                f"the policy {policy.source} ({ENV_POLICY}) declares scopes that {ENV_TABLE} does "
                f"not ({', '.join(undeclared)}); the runtime enforces the table, and "
                "active_policy() describes it",
                AllocPolicyWarning,
                stacklevel=4,
            )
            policy = None
    if policy is not None:
        return policy
    if handed_table:
        # A table set by hand, with no policy to go with it: describe what the
        # runtime really enforces.
        return _policy_from_runtime(rt)
    return default_policy()


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
