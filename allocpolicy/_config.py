"""The active policy of this process and how Python changes it."""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Mapping

from . import _native
from ._errors import PolicyError, UnknownScopeError
from ._policy import Policy, default_policy, load_policy, policy_from_environment, policy_from_mapping

__all__ = ["configure", "active_policy", "is_active", "AllocPolicyWarning"]


class AllocPolicyWarning(RuntimeWarning):
    """Something allocpolicy cannot do as asked, without being an error."""


_lock = threading.Lock()
_active: Policy | None = None
_scope_ids: dict[str, int] = {}
_scope_names: dict[int, str] = {}
_warned_inactive = False


def is_active() -> bool:
    """True when the runtime is preloaded and governs this process's allocations."""
    return _native.runtime() is not None


def active_policy() -> Policy:
    """The policy in force: the last one configured, the one handed over by
    ``allocpolicy run``, or the built-in default."""
    global _active
    if _active is None:
        with _lock:
            if _active is None:
                try:
                    _active = policy_from_environment() or default_policy()
                except PolicyError as err:
                    # The file changed after `allocpolicy run` compiled it: the
                    # runtime keeps what it was handed; say so, don't fail.
                    warnings.warn(
                        f"the policy file named in the environment no longer loads; "
                        f"the runtime keeps the policy it was started with:\n{err}",
                        AllocPolicyWarning,
                        stacklevel=2,
                    )
                    _active = default_policy()
    return _active


def configure(policy: Policy | Mapping | str | os.PathLike) -> Policy:
    """Make ``policy`` the active policy and return it.

    ``policy`` is a :class:`Policy` (from :func:`load_policy`), a mapping shaped
    like the TOML file, or the path of a policy file. Scopes are matched by
    name: settings of existing scopes change for instances entered from now on,
    new scopes are added. If the policy is invalid, :class:`PolicyError` is
    raised and the previous policy stays in force.
    """
    global _active
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
        raise UnknownScopeError(name, list(active_policy().scopes))
    _scope_ids[name] = sid
    _scope_names[sid] = name
    return sid


def scope_name(rt: _native.Runtime, sid: int) -> str:
    try:
        return _scope_names[sid]
    except KeyError:
        pass
    st = rt.scope_stats(sid)
    name = st.name.decode("utf-8", "replace") if st is not None else f"#{sid}"
    _scope_names[sid] = name
    return name
