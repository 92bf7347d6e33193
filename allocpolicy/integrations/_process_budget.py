"""Setting this process's budget from Python, for the integrations that know
better than the policy file what one process may hold (a Dask worker's
``memory_limit``, a pre-forked worker's share of the server)."""

from __future__ import annotations

import dataclasses

import allocpolicy

__all__ = ["process_budget", "set_process_budget"]


def process_budget() -> int | None:
    """The process budget the runtime enforces now, in bytes (a percentage
    in the policy resolved), or ``None`` when there is none or no runtime."""
    s = allocpolicy.stats()
    return s.process.budget if s.active and s.process is not None else None


def set_process_budget(nbytes: int | None) -> allocpolicy.Policy:
    """Make ``nbytes`` this process's budget, keeping every other setting of
    the active policy; takes effect at once (see :func:`allocpolicy.configure`)."""
    if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0):
        raise ValueError(f"argument 'nbytes' must be a positive int or None, got {nbytes!r}")
    policy = allocpolicy.active_policy()
    process = dataclasses.replace(policy.process, budget=nbytes)
    return allocpolicy.configure(dataclasses.replace(policy, process=process))
