"""Budgets that are valid but cannot be what the author meant.

``allocpolicy check`` prints these as warnings (exit status 0): the policy
loads and runs, but a budget larger than the memory the process can ever
have, a ``total_budget`` smaller than one instance's ``budget``, or a scope
budget above the process budget means a limit that never acts as written.
"""

from __future__ import annotations

from ._errors import PolicyProblem
from ._policy import _CGROUP_ROOT, _PROC_ROOT, Policy, memory_limit, resolve_process_budget
from ._sizes import format_size

__all__ = ["budget_warnings"]


def _size(n: int) -> str:
    return f"{n} bytes ({format_size(n)})"


def budget_warnings(policy: Policy, *, proc_root: str = _PROC_ROOT, cgroup_root: str = _CGROUP_ROOT) -> list[PolicyProblem]:
    """One :class:`PolicyProblem` per budget that cannot be meant, in file order."""
    found: list[PolicyProblem] = []

    def warn(table: str, key: str, message: str) -> None:
        found.append(PolicyProblem(policy.source, table, key, message))

    try:
        machine, basis = memory_limit(proc_root=proc_root, cgroup_root=cgroup_root)
    except OSError:
        machine, basis = None, ""
    try:
        process = resolve_process_budget(policy.process.budget, proc_root=proc_root, cgroup_root=cgroup_root)
    except OSError:
        process = None

    def above_machine(table: str, key: str, value: int | None) -> bool:
        if machine is not None and value is not None and value > machine:
            warn(table, key, f"{_size(value)} is more than this machine can give the process: "
                             f"{_size(machine)} ({basis}); the budget can never be reached")
            return True
        return False

    if isinstance(policy.process.budget, int):  # a percentage is of the machine by definition
        above_machine("process", "budget", process)
    for name, scope in policy.scopes.items():
        table = f"scopes.{_table_key(name)}"
        # One line per key: what is above the machine is above the process budget too.
        for key in ("budget", "total_budget"):
            value = getattr(scope, key)
            if above_machine(table, key, value) or value is None or process is None:
                continue
            if value > process:
                warn(table, key, f"{_size(value)} is above the process budget of {_size(process)}: "
                                 "the process budget refuses first")
        if scope.budget is not None and scope.total_budget is not None and scope.total_budget < scope.budget:
            warn(table, "total_budget", f"{_size(scope.total_budget)} is smaller than the scope's budget "
                                        f"of {_size(scope.budget)}: no instance can ever use its budget")
    return found


def _table_key(name: str) -> str:
    # As TOML spells it: a dotted or otherwise unusual name is quoted.
    return name if name.replace("_", "").replace("-", "").isalnum() else f'"{name}"'
