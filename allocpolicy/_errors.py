"""The exceptions of allocpolicy.

::

    AllocPolicyError
     ├── AllocError          (also a MemoryError)  an allocation was refused
     ├── PolicyError         (also a ValueError)   a policy file or mapping is wrong
     ├── UnknownScopeError   (also a LookupError)  a scope name the policy does not declare
     ├── RuntimeLoadError    (also an OSError)     the native library cannot be used
     ├── ScopeCapacityError  (also a RuntimeError) too many nested or active scope instances
     └── ScopeMismatchError  (also a RuntimeError) a scope left out of the order of entries

``AllocError`` subclasses ``MemoryError`` so that existing ``except MemoryError``
handlers keep working; ``PolicyError`` subclasses ``ValueError`` because it is
bad input.
"""

from __future__ import annotations

__all__ = [
    "AllocPolicyError",
    "AllocPolicyWarning",
    "AllocError",
    "PolicyError",
    "PolicyProblem",
    "UnknownScopeError",
    "RuntimeLoadError",
    "ScopeCapacityError",
    "ScopeMismatchError",
]

#: Reasons an allocation can be refused, as carried by :attr:`AllocError.reason`.
REASONS = ("budget", "oom", "injected", "forbidden")


class AllocPolicyError(Exception):
    """Base class of every exception raised by allocpolicy."""


class AllocPolicyWarning(RuntimeWarning):
    """Something allocpolicy cannot do as asked, without being an error."""


class AllocError(AllocPolicyError, MemoryError):
    """An allocation was refused by the runtime's policy.

    Raised at a task boundary (:func:`allocpolicy.task`) in place of the
    ``MemoryError`` that the refused allocation caused.

    Attributes:
        scope: name of the scope whose limit refused the allocation (the
            innermost scope for reasons other than ``"budget"``).
        size: bytes requested by the refused allocation.
        budget: the limit that refused it, in bytes (``None`` if none applied).
        live: bytes live under that limit when it refused.
        reason: ``"budget"``, ``"oom"``, ``"injected"`` or ``"forbidden"``.
        limit: which limit refused: ``"budget"`` (the instance's own),
            ``"total_budget"``, ``"process"``, ``"reservation"`` (an overdraft
            of a reservation whose policy is ``overdraft = "raise"``), or ``None``.
        task: name of the task boundary that converted the error.
        count: for ``"forbidden"``: how many offending allocations (and frees,
            where they count) the region saw; 1 otherwise.
        index: for ``"injected"``: the injection index of the failed
            allocation, which reproduces it (``nth=index`` in the same scope).
    """

    def __init__(
        self,
        *,
        scope: str,
        size: int,
        budget: int | None,
        live: int,
        reason: str,
        limit: str | None = None,
        task: str | None = None,
        count: int = 1,
        index: int | None = None,
    ) -> None:
        self.scope = scope
        self.size = size
        self.budget = budget
        self.live = live
        self.reason = reason
        self.limit = limit
        self.task = task
        self.count = count
        self.index = index
        super().__init__(self._message())

    def _message(self) -> str:
        text = f"allocation of {self.size} bytes refused in scope {self.scope!r}"
        if self.reason == "budget" and self.budget is not None:
            if self.limit == "reservation":
                return (
                    f"{text}: beyond its reservation of {self.budget} bytes "
                    f"({self.live} bytes of it in use)"
                )
            what = {"total_budget": "its total_budget", "process": "the process budget"}.get(
                self.limit or "", "its budget"
            )
            return f"{text}: over {what} of {self.budget} bytes ({self.live} bytes live)"
        if self.limit == "machine":
            return (
                f"{text}: the machine cannot spare it ({self.budget} bytes free after the "
                "policy's reserve_margin)"
            )
        if self.reason == "injected" and self.index is not None:
            return f"{text}: injected failure #{self.index} (replay with nth={self.index})"
        if self.reason == "forbidden":
            if not self.size:
                return f"a free in scope {self.scope!r}: frees are forbidden here ({self.count} in all)"
            more = f" ({self.count} offences in all)" if self.count > 1 else ""
            return f"{text}: allocation is forbidden here{more}"
        why = {
            "oom": "the allocator is out of memory",
            "injected": "an injected failure",
        }.get(self.reason, self.reason)
        return f"{text}: {why}"

    def __reduce__(self):
        # Keyword-only __init__: pickling (multiprocessing, concurrent.futures)
        # needs to rebuild from the attributes.
        return _rebuild_alloc_error, (
            self.scope,
            self.size,
            self.budget,
            self.live,
            self.reason,
            self.limit,
            self.task,
            self.count,
            self.index,
        )


def _rebuild_alloc_error(scope, size, budget, live, reason, limit, task, count=1, index=None):
    return AllocError(
        scope=scope,
        size=size,
        budget=budget,
        live=live,
        reason=reason,
        limit=limit,
        task=task,
        count=count,
        index=index,
    )


class PolicyProblem:
    """One mistake in a policy: where it is and what was expected.

    Attributes:
        source: the file path, or a description such as ``"<configure>"``.
        table: dotted TOML table, e.g. ``"scopes.request"`` (``""`` for the top level).
        key: the offending key, if the mistake is about one key.
        message: what is wrong and what was expected.
    """

    # A plain class rather than a dataclass: this module is imported when every
    # interpreter under `allocpolicy run` starts, and dataclasses pulls in
    # inspect and re.
    __slots__ = ("source", "table", "key", "message")

    def __init__(self, source: str, table: str, key: str | None, message: str) -> None:
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "table", table)
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "message", message)

    def __setattr__(self, name, value):
        raise AttributeError(f"PolicyProblem is immutable; cannot set {name!r}")

    def _fields(self) -> tuple:
        return (self.source, self.table, self.key, self.message)

    def __eq__(self, other) -> bool:
        if not isinstance(other, PolicyProblem):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return "PolicyProblem(source={!r}, table={!r}, key={!r}, message={!r})".format(
            *self._fields()
        )

    def __str__(self) -> str:
        where = f"[{self.table}]" if self.table else "top level"
        if self.key is not None:
            where += f" key {self.key!r}"
        return f"{self.source}: {where}: {self.message}"


class PolicyError(AllocPolicyError, ValueError):
    """A policy could not be loaded; :attr:`problems` lists every mistake found."""

    def __init__(self, problems: list[PolicyProblem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def did_you_mean(word: str, choices) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices``, or ``""``."""
    import difflib  # only on the way to an error message

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class UnknownScopeError(AllocPolicyError, LookupError):
    """A scope name that the active policy does not declare."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = list(known)
        listed = ", ".join(sorted(known)) or "none"
        super().__init__(
            f"scope {name!r} is not declared in the active policy{did_you_mean(name, known)} "
            f"(declared scopes: {listed})"
        )


class RuntimeLoadError(AllocPolicyError, OSError):
    """The native runtime library is missing or does not match this package."""


class ScopeCapacityError(AllocPolicyError, RuntimeError):
    """A scope cannot be entered: 32 nested scopes on one thread, or 65536
    scope instances active at once, is the runtime's fixed capacity (ended
    instances hold none, whatever memory they left behind)."""


class ScopeMismatchError(AllocPolicyError, RuntimeError):
    """A ``with scope()``/``task()`` block was left while a scope entered
    after it on the same thread was still active (generators or coroutines
    that hold scopes across ``yield``/``await`` and are resumed in another
    order). The message names both scopes; no other scope's instance is
    left in its place."""
