"""Putting a policy in force: in the runtime, and in every feature a policy sets up.

:func:`configure` is the one place that applies a whole policy: the compiled
table (scopes, budgets, the process settings and an ``[inject]`` table) to the
runtime, then what the policy means for the features above it: the injection
setting :func:`allocpolicy.inject` puts back, and the scopes bound to modules.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

from . import _config, _inject, _modules, _native
from ._errors import AllocPolicyError, AllocPolicyWarning
from ._policy import Policy, default_policy, load_policy, policy_from_mapping

__all__ = ["configure", "policy_argument", "start"]


def policy_argument(policy: object, expected: str) -> Policy:
    """The :class:`Policy` an API argument gives: a Policy, a mapping shaped
    like the TOML file, or a path; a TypeError saying ``expected`` otherwise."""
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, Mapping):
        return policy_from_mapping(policy, require_version=False)
    if isinstance(policy, (str, os.PathLike)):
        return load_policy(policy)
    raise TypeError(f"{expected}, not {type(policy).__name__}")


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
    new = policy_argument(policy, "configure(): argument 'policy' must be a Policy, a mapping or a path")
    rt = _native.runtime()
    _config.put_in_force(new, rt)
    if rt is not None:
        _set_up_features(new, rt)
    return new


def _set_up_features(new: Policy, rt: _native.Runtime) -> None:
    """What a policy in force means above the runtime."""
    if new.inject is not None:
        # The table carried it; inject() must know it to put it back.
        _inject.applied(new.inject)
    # After the scopes exist in the runtime: bindings enter them by id.
    _modules.apply(new, rt)


def start(rt: _native.Runtime) -> None:
    """Under a preload without a compiled table (``LD_PRELOAD`` set by hand, as
    a container or a systemd unit does): put the starting policy in force, the
    one ``ALLOCPOLICY_POLICY`` names or the built-in default, so that the
    runtime enforces what :func:`allocpolicy.active_policy` reports. At
    interpreter startup nobody could catch an error: a policy that cannot be
    put in force is a warning, and the built-in default holds."""
    policy = _config.active_policy()
    try:
        _config.put_in_force(policy, rt)
    except AllocPolicyError as err:
        warnings.warn(
            f"the policy {policy.source} could not be put in force; the built-in default "
            f"policy applies instead: {err}",
            AllocPolicyWarning,
            stacklevel=3,
        )
        policy = default_policy()
        _config.put_in_force(policy, rt)
    try:
        _set_up_features(policy, rt)
    except AllocPolicyError as err:
        warnings.warn(
            f"the modules of the policy {policy.source} are not bound to their scopes: {err}",
            AllocPolicyWarning,
            stacklevel=3,
        )
