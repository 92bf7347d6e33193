"""The active policy of this process and how Python changes it.

Entering scopes needs only the scope ids; the policy model (with TOML
parsing, dataclasses and their imports) is loaded when a policy is read or
configured. Every module a program imports adds objects that each full
garbage collection walks, so the scope path keeps its imports small.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

from . import _atfork, _native
from ._errors import AllocPolicyError, AllocPolicyWarning, PolicyError, UnknownScopeError

if TYPE_CHECKING:
    from ._policy import Policy

__all__ = ["configure", "active_policy", "is_active", "AllocPolicyWarning"]


_lock = _atfork.lock()
_active: Policy | None = None
_scope_ids: dict[str, int] = {}
_scope_names: dict[int, str] = {}
_warned_inactive = False


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
    from ._policy import ENV_POLICY, ENV_TABLE, default_policy, policy_from_environment

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
    if policy is not None:
        return policy
    if handed_table:
        # A table set by hand, with no policy to go with it: describe what the
        # runtime really enforces.
        return _policy_from_runtime(rt)
    return default_policy()


def start(rt: _native.Runtime) -> None:
    """Under a preload without a compiled table (``LD_PRELOAD`` set by hand):
    put the starting policy in force, so that the runtime enforces what
    :func:`active_policy` reports."""
    policy = active_policy()
    try:
        configure(policy)
    except AllocPolicyError as err:
        # At interpreter startup nobody could catch it.
        warnings.warn(
            f"the policy {policy.source} could not be put in force, so no budgets apply: {err}",
            AllocPolicyWarning,
            stacklevel=3,
        )


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


def configure(policy: Policy | Mapping | str | os.PathLike) -> Policy:
    """Make ``policy`` the active policy and return it.

    ``policy`` is a :class:`Policy` (from :func:`load_policy`), a mapping shaped
    like the TOML file (``version`` may be left out), or the path of a policy
    file. Scopes are matched by name and new ones are added. A scope's
    per-instance ``budget`` applies to instances entered from now on; its
    ``on_oom``, its ``total_budget`` and the process settings take effect at
    once, also for instances already running. Scopes are never removed: one
    that the new policy leaves out keeps its last settings and can still be
    entered. If the policy is invalid, :class:`PolicyError` is raised and the
    previous policy stays in force.
    """
    global _active
    from ._policy import Policy, load_policy, policy_from_mapping

    if isinstance(policy, Policy):
        new = policy
    elif isinstance(policy, Mapping):
        new = policy_from_mapping(policy, require_version=False)
    elif isinstance(policy, (str, os.PathLike)):
        new = load_policy(policy)
    else:
        raise TypeError(
            "configure(): argument 'policy' must be a Policy, a mapping or a path, "
            f"not {type(policy).__name__}"
        )
    rt = _native.runtime()
    with _lock:
        if rt is not None:
            rt.configure(new.compile())
        _active = new
    if rt is not None and new.inject is not None:
        # The table carried it; inject() must know it to put it back.
        from . import _inject

        _inject.applied(new.inject)
    if rt is not None:
        # After the scopes exist in the runtime: bindings enter them by id.
        from . import _modules

        _modules.apply(new, rt)
    return new


def warn_inactive() -> None:
    global _warned_inactive
    if not _warned_inactive:
        _warned_inactive = True
        warnings.warn(
            "the allocpolicy runtime is not preloaded in this process, so scopes and budgets "
            "are not enforced; start the program with `allocpolicy run -- ...`",
            AllocPolicyWarning,
            stacklevel=3,
        )


def scope_id(rt: _native.Runtime, name: str) -> int:
    """Runtime id of a scope name (ids never change once assigned)."""
    try:
        return _scope_ids[name]
    except KeyError:
        pass
    sid = rt.scope_id(name)
    if sid is None or sid == 0:
        raise _unknown_scope(rt, name)
    _scope_ids[name] = sid
    _scope_names[sid] = name
    return sid


def _unknown_scope(rt: _native.Runtime, name: str) -> UnknownScopeError:
    """The error for a name the runtime does not know. It lists the scopes the
    runtime knows, which are the ones that can be entered; a policy that
    declares the name but was never put in force is named as such."""
    known = [scope_name(rt, sid) for sid in range(1, rt.process_stats().scopes)]
    policy = active_policy()
    if name in policy.scopes:
        return UnknownScopeError(
            name,
            known,
            f"scope {name!r} is declared in the policy {policy.source} but the runtime was not "
            f"configured with it (scopes in force: {', '.join(sorted(known)) or 'none'}); "
            "apply the policy with allocpolicy.configure() or start the program with `allocpolicy run`",
        )
    return UnknownScopeError(name, known)


def scope_name(rt: _native.Runtime, sid: int) -> str:
    try:
        return _scope_names[sid]
    except KeyError:
        pass
    st = rt.scope_stats(sid)
    name = st.name.decode("utf-8", "replace") if st is not None else f"#{sid}"
    _scope_names[sid] = name
    return name
