"""The policy model, its TOML loader and its compiled form.

A policy file looks like this (see ``default_policy.toml`` for the annotated
original)::

    version = 1

    [process]
    on_oom = "raise"        # "raise", "abort" or "fallible"
    budget = "80%"          # bytes, a size string, or a share of memory

    [scopes.request]
    on_oom = "raise"
    budget = "256 MiB"      # per instance
    total_budget = "2 GiB"  # all live instances together

Loading checks every key and reports every mistake in one :class:`PolicyError`,
one :class:`PolicyProblem` per mistake, each naming the file, the table and the
key. The native library never sees TOML: :meth:`Policy.compile` turns a valid
policy into the flat table string that ``native/src/policy.c`` parses.
"""

from __future__ import annotations

__all__ = [
    "BUILTIN_SOURCE",
    "CONFIGURE_SOURCE",
    "ENV_POLICY",
    "ENV_POLICY_TOML",
    "ENV_TABLE",
    "MODES",
    "POLICY_VERSION",
    "Percent",
    "Policy",
    "ProcessPolicy",
    "ScopeMap",
    "ScopePolicy",
    "default_policy",
    "load_policy",
    "load_policy_text",
    "memory_limit",
    "policy_from_environment",
    "policy_from_mapping",
    "resolve_process_budget",
]

import datetime
import functools
import importlib.resources
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import _offenders
from ._errors import PolicyError, PolicyProblem
from ._errors import did_you_mean as _did_you_mean
from ._inject_settings import VALIDATORS as _INJECT_VALIDATORS
from ._inject_settings import InjectSettings, check_combination
from ._machine import CGROUP_ROOT as _CGROUP_ROOT
from ._machine import PROC_ROOT as _PROC_ROOT
from ._machine import memory_limit
from ._sizes import MAX_SIZE, MiB, Percent, format_size, parse_size

#: Environment variable carrying the compiled table to a preloaded library.
ENV_TABLE = "ALLOCPOLICY_TABLE"
#: Environment variable naming where the policy came from: an absolute file
#: path, or :data:`BUILTIN_SOURCE`. Lets Python code in the launched program
#: recover the full policy (scope names, percent budgets) that the table lost.
#: Set by hand (without a table), it names the policy file that a process
#: started with a bare ``LD_PRELOAD`` applies when its interpreter starts.
ENV_POLICY = "ALLOCPOLICY_POLICY"
#: Environment variable carrying the policy file's text as ``allocpolicy run``
#: read it: the command parses exactly what was compiled, whatever the source
#: was (a pipe, ``<(...)``, a file changed since), and never reads it again.
ENV_POLICY_TOML = "ALLOCPOLICY_POLICY_TOML"
#: A policy file is a few kilobytes; a larger "file" is a mistake (``/dev/zero``).
MAX_POLICY_BYTES = 1 << 20

BUILTIN_SOURCE = "<built-in default>"
CONFIGURE_SOURCE = "<configure>"

POLICY_VERSION = 1
MODES = ("raise", "abort", "fallible")
#: What a forbidden allocation (``on_violation``) or a reservation overdraft
#: (``overdraft``) does.
ACTIONS = ("raise", "abort", "warn", "count")
PROCESS_SCOPE = "process"

# The native side keeps AP_MAX_SCOPES (256) scopes, the process scope included.
MAX_SCOPES = 255
# native/src/policy.c refuses larger descriptors.
MAX_FD = 1 << 20
# A scope name must fit AP_SCOPE_NAME_MAX (64, NUL included) and the table
# grammar; starting with a letter or underscore keeps names identifier-like.
SCOPE_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,62}")

DEFAULT_GRACE = 4 * MiB
DEFAULT_RESERVE_MARGIN = 64 * MiB
DEFAULT_REPORT_FD = 2



# --- Validators -------------------------------------------------------------
#
# Each takes the raw value (from TOML or a mapping) and returns the normalized
# one, or raises ValueError with a message that says what was expected.


def _kind(value: object) -> str:
    """How a value reads to someone writing TOML."""
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a float ({value!r})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, (datetime.date, datetime.time)):
        return f"a date/time ({value})"
    return f"{type(value).__name__} ({value!r:.40})"


def _mode(value: object) -> str:
    choices = ", ".join(repr(m) for m in MODES)
    if not isinstance(value, str):
        raise ValueError(f"expected one of {choices}, got {_kind(value)}")
    if value not in MODES:
        raise ValueError(f"unknown mode {value!r}{_did_you_mean(value, MODES)}; expected one of {choices}")
    return value


def _action(value: object) -> str:
    choices = ", ".join(repr(a) for a in ACTIONS)
    if not isinstance(value, str):
        raise ValueError(f"expected one of {choices}, got {_kind(value)}")
    if value not in ACTIONS:
        raise ValueError(
            f"unknown action {value!r}{_did_you_mean(value, ACTIONS)}; expected one of {choices}"
        )
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_kind(value)}")
    return value


def _margin(value: object) -> int | Percent:
    if isinstance(value, Percent):
        return value
    return parse_size(value, allow_percent=True)


def _size(value: object) -> int:
    return parse_size(value)  # type: ignore[return-value]


def _budget(value: object) -> int:
    size = _size(value)
    # 0 is "no limit" in the compiled table; a budget of 0 written on purpose
    # must not silently mean the opposite.
    if size == 0:
        raise ValueError("must be greater than 0 (leave the key out for no limit)")
    return size


def _process_budget(value: object) -> int | Percent:
    if isinstance(value, Percent):
        return value
    size = parse_size(value, allow_percent=True)
    if size == 0:
        raise ValueError("must be greater than 0 (leave the key out for no limit)")
    return size


def _fd(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a file descriptor number (an integer >= 0), got {_kind(value)}")
    if not 0 <= value <= MAX_FD:
        raise ValueError(f"expected a file descriptor number between 0 and {MAX_FD}, got {value}")
    return value


# Module patterns (``modules = ["PIL.*", "myapp.thumbnails"]``) are dotted
# module names whose segments may be ``*``. A ``*`` stands for exactly one
# segment, except as the last segment, where it stands for one or more: "PIL.*"
# is every module under PIL, at any depth, but not PIL itself. Whole segments
# only, so that two patterns can be checked for overlap exactly when the policy
# is loaded instead of failing later on whichever module is imported first.
_MODULE_EXAMPLE = '["PIL.*", "myapp.thumbnails"]'


def _module_pattern_problem(pattern: object) -> str | None:
    if not isinstance(pattern, str):
        return f"expected a module name, got {_kind(pattern)}"
    if not pattern:
        return "an empty string is not a module name"
    segments = pattern.split(".")
    for seg in segments:
        if seg == "*":
            continue
        if not seg:
            return "empty name segment (a leading, trailing or doubled '.')"
        if "*" in seg:
            return f"'*' must stand for a whole name segment: {seg!r} mixes it with letters"
        if not seg.isidentifier():
            return f"{seg!r} is not a valid module name segment"
    if all(seg == "*" for seg in segments):
        return "would bind every module; the [process] table governs code outside scopes"
    if segments[0] == "allocpolicy":
        return "allocpolicy's own modules cannot be bound to a scope"
    return None


def _pattern_array(value: object, what: str, problem_of: Callable[[object], str | None]) -> tuple[str, ...]:
    """An array of patterns, each checked by ``problem_of``; duplicates dropped."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"expected an array of {what}, got {_kind(value)}")
    problems = []
    patterns: list[str] = []
    for pattern in value:
        problem = problem_of(pattern)
        if problem:
            problems.append(f"{pattern!r}: {problem}")
        elif pattern not in patterns:
            patterns.append(pattern)  # type: ignore[arg-type]
    if problems:
        raise ValueError("; ".join(problems))
    return tuple(patterns)


def _module_patterns(value: object) -> tuple[str, ...]:
    return _pattern_array(value, f"module names such as {_MODULE_EXAMPLE}", _module_pattern_problem)


def module_patterns_overlap(a: str, b: str) -> str | None:
    """A module name that both patterns match, or ``None`` when none can."""
    sa, sb = a.split("."), b.split(".")
    # A trailing "*" matches one or more segments, any other part exactly one.
    open_a, open_b = sa[-1] == "*", sb[-1] == "*"
    if not open_a and not open_b and len(sa) != len(sb):
        return None
    if (open_a and not open_b and len(sb) < len(sa)) or (open_b and not open_a and len(sa) < len(sb)):
        return None
    witness = []
    for i in range(max(len(sa), len(sb))):
        x = sa[i] if i < len(sa) else "*"
        y = sb[i] if i < len(sb) else "*"
        if x != "*" and y != "*" and x != y:
            return None
        witness.append(x if x != "*" else y if y != "*" else "mod")
    return ".".join(witness)


def _module_conflicts(scopes: Iterable["ScopePolicy"]) -> list[tuple[str, str]]:
    """(scope name, message) for each pattern that claims modules another scope claims."""
    out = []
    earlier: list[tuple[str, str]] = []
    for sc in scopes:
        for pattern in sc.modules:
            for other, other_pattern in earlier:
                witness = module_patterns_overlap(pattern, other_pattern)
                if witness:
                    out.append((
                        sc.name,
                        f"{pattern!r} and {other_pattern!r} of scope {other!r} both match modules "
                        f"such as {witness!r}, which would be claimed by scopes {other!r} and "
                        f"{sc.name!r}; a module can be bound to one scope only",
                    ))
        earlier += [(sc.name, p) for p in sc.modules]
    return out


# Library patterns (``libraries = ["libz.so*"]``, ``raise_only_from = [...]``)
# are globs matched against the file name of a loaded shared object, without
# its directory ("libz.so.1"; the main program by the name of its executable,
# "python3.11"): ``*`` any run of characters, ``?`` one. The characters are
# those native/src/policy.c accepts (GLOB).
_LIBRARY_EXAMPLE = '["libz.so*", "libpng16.so*"]'
_LIBRARY_PATTERN_RE = re.compile(r"[A-Za-z0-9_.+*?-]{1,63}")
#: Always counted as checking for NULL wherever ``raise_only_from`` is set: the
#: interpreter (its executable and libpython check every allocation), CPython
#: extension modules (the C API has them raise MemoryError when an allocation
#: fails: NumPy's arrays, the standard library's modules), the C library and
#: the dynamic loader (which report ENOMEM to their callers), and libstdc++
#: (whose operator new turns NULL into std::bad_alloc).
NULL_CHECKING_DEFAULT = (
    "python*",
    "libpython*",
    "*.cpython-*",
    "*.abi3.so",
    "libc.so*",
    "ld-linux*",
    "libstdc++.so*",
)


def _library_pattern_problem(pattern: object) -> str | None:
    if not isinstance(pattern, str):
        return f"expected a file name pattern, got {_kind(pattern)}"
    if not pattern:
        return "an empty string is not a file name pattern"
    if "/" in pattern:
        return "patterns match the file name only, without a directory (e.g. 'libz.so*')"
    if not _LIBRARY_PATTERN_RE.fullmatch(pattern):
        if len(pattern) > 63:
            return "longer than 63 characters"
        return "only letters, digits and '_', '.', '+', '-', '*', '?' may appear in a file name pattern"
    if set(pattern) <= {"*", "?"}:
        return "would match every shared object; the [process] table governs code outside scopes"
    return None


def _library_patterns(value: object) -> tuple[str, ...]:
    return _pattern_array(
        value, f"shared object file name patterns such as {_LIBRARY_EXAMPLE}", _library_pattern_problem
    )


def _raise_only(value: object) -> tuple[str, ...]:
    # An empty array is meaningful: nothing but the defaults checks for NULL.
    if isinstance(value, (list, tuple)) and not value:
        return ()
    return _library_patterns(value)


def _library_conflicts(scopes: Iterable["ScopePolicy"]) -> list[tuple[str, str]]:
    """(scope name, message) for each library pattern another scope claims too,
    and for forbid scopes bound to libraries."""
    out = []
    owner: dict[str, str] = {}
    for sc in scopes:
        if sc.libraries and sc.forbid:
            out.append((
                sc.name,
                "a forbid scope cannot be bound to libraries (a library's allocations are "
                "governed by budgets and modes; use no_alloc() around the calls instead)",
            ))
        for pattern in sc.libraries:
            if pattern in owner:
                out.append((
                    sc.name,
                    f"{pattern!r} is bound to scope {owner[pattern]!r} already; a library can be "
                    "bound to one scope only",
                ))
            else:
                owner[pattern] = sc.name
    return out


# --- Declarative key tables ---------------------------------------------------
#
# One line per key: its name (also the name of the dataclass field that holds
# it) and its validator. An optional key's field defaults to None ("not set").


@dataclass(frozen=True)
class _Key:
    validate: Callable[[object], Any]
    optional: bool = False


_PROCESS_KEYS: dict[str, _Key] = {
    "on_oom": _Key(_mode),
    "budget": _Key(_process_budget, optional=True),
    "grace": _Key(_size),
    "report_fd": _Key(_fd),
    "overdraft": _Key(_action),
    "reserve_margin": _Key(_margin),
    "raise_only_from": _Key(_raise_only, optional=True),
}

_SCOPE_KEYS: dict[str, _Key] = {
    "on_oom": _Key(_mode),
    "budget": _Key(_budget, optional=True),
    "total_budget": _Key(_budget, optional=True),
    "overdraft": _Key(_action),
    "forbid": _Key(_bool),
    "on_violation": _Key(_action),
    "frees": _Key(_bool),
    "modules": _Key(_module_patterns),
    "libraries": _Key(_library_patterns),
    "raise_only_from": _Key(_raise_only, optional=True),
}

# [inject]: fault injection from the start of the process (see _inject.py).
# Every key is optional; the validators are those of allocpolicy.inject().
_INJECT_KEYS: dict[str, _Key] = {key: _Key(check, optional=True) for key, check in _INJECT_VALIDATORS.items()}

_TOP_KEYS = ("version", "include", "process", "scopes", "inject")


def _check_fields(obj: object, keys: Mapping[str, _Key]) -> None:
    """Validate and normalize the fields of a frozen dataclass built directly."""
    for key, spec in keys.items():
        value = getattr(obj, key)
        if value is None and spec.optional:
            continue
        try:
            object.__setattr__(obj, key, spec.validate(value))
        except ValueError as exc:
            raise ValueError(f"{type(obj).__name__}(): argument {key!r}: {exc}") from None


# --- The model -----------------------------------------------------------------


@dataclass(frozen=True)
class ProcessPolicy:
    """Settings of the process scope, the root of every scope stack.

    ``budget`` is bytes, a :class:`Percent` of the memory available (resolved when
    the policy is applied), or ``None`` for no limit. ``grace`` is the allowance
    a thread may still allocate in an instance after a refusal, so that building
    and raising the error and unwinding succeed. ``report_fd`` receives
    diagnostics. ``overdraft`` is what going beyond a reservation made outside
    any scope does. ``reserve_margin`` is the memory a reservation must leave
    free on the machine (bytes or a :class:`Percent` of the memory limit).
    """

    on_oom: str = "raise"
    budget: int | Percent | None = None
    grace: int = DEFAULT_GRACE
    report_fd: int = DEFAULT_REPORT_FD
    overdraft: str = "count"
    reserve_margin: int | Percent = DEFAULT_RESERVE_MARGIN
    #: In raise mode, refused allocations return NULL only to code in these
    #: shared objects (and :data:`NULL_CHECKING_DEFAULT`); others abort.
    #: ``None``: every caller gets NULL.
    raise_only_from: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _check_fields(self, _PROCESS_KEYS)


@dataclass(frozen=True)
class ScopePolicy:
    """Settings of one named scope. Budgets are bytes, or ``None`` for no limit.

    ``budget`` applies to each instance (each entry into the scope);
    ``total_budget`` to all live instances of the scope together.
    ``overdraft`` is what an allocation beyond a reservation made in the scope
    does. ``forbid`` makes the scope a no-allocation region, whose offences
    ``on_violation`` handles; with ``frees`` frees count as offences too.
    """

    name: str
    on_oom: str = "raise"
    budget: int | None = None
    total_budget: int | None = None
    overdraft: str = "count"
    forbid: bool = False
    on_violation: str = "raise"
    frees: bool = False
    #: Module patterns whose code runs in this scope (see docs/binding.rst).
    modules: tuple[str, ...] = ()
    #: Shared objects (file name globs) whose allocations this scope governs.
    libraries: tuple[str, ...] = ()
    #: raise_only_from for refusals in this scope; ``None``: the process's.
    raise_only_from: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        problem = _scope_name_problem(self.name)
        if problem:
            raise ValueError(f"ScopePolicy(): argument 'name': {problem}")
        _check_fields(self, _SCOPE_KEYS)


def _scope_name_problem(name: object) -> str | None:
    if not isinstance(name, str):
        return f"a scope name must be a string, got {_kind(name)}"
    if name == PROCESS_SCOPE:
        return "'process' is reserved for the process scope; configure it in [process]"
    if not SCOPE_NAME_RE.fullmatch(name):
        return (
            f"invalid scope name {name!r}: expected a letter or '_' followed by at most 62 "
            "letters, digits, '_', '.' or '-'"
        )
    return None


class ScopeMap(Mapping[str, ScopePolicy]):
    """Read-only, hashable mapping of scope name to :class:`ScopePolicy`, in declaration order."""

    __slots__ = ("_pairs", "_index")

    def __init__(self, scopes: Mapping[str, ScopePolicy] | Iterable[ScopePolicy] = ()) -> None:
        if isinstance(scopes, Mapping):
            pairs = tuple(scopes.items())
        else:
            pairs = tuple((sc.name, sc) for sc in scopes)
        for name, sc in pairs:
            if not isinstance(sc, ScopePolicy):
                raise TypeError(f"scope {name!r}: expected a ScopePolicy, got {type(sc).__name__}")
            if sc.name != name:
                raise ValueError(f"scope {name!r} holds a ScopePolicy named {sc.name!r}")
        index = dict(pairs)
        if len(index) != len(pairs):
            raise ValueError("a scope is declared twice")
        object.__setattr__(self, "_pairs", pairs)
        object.__setattr__(self, "_index", index)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("ScopeMap is read-only")

    def __getitem__(self, name: str) -> ScopePolicy:
        return self._index[name]

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._pairs)

    def __len__(self) -> int:
        return len(self._pairs)

    def __hash__(self) -> int:
        # Order-insensitive, like Mapping.__eq__.
        return hash(frozenset(self._pairs))

    def __repr__(self) -> str:
        return f"ScopeMap({list(self._index.values())!r})"


@dataclass(frozen=True)
class Policy:
    """A validated policy: the process settings and the declared scopes.

    Immutable and hashable. Build it with :func:`load_policy`,
    :func:`allocpolicy.configure` (from a mapping) or :func:`default_policy`, or directly from
    :class:`ProcessPolicy` and :class:`ScopePolicy` values.
    """

    version: int = POLICY_VERSION
    process: ProcessPolicy = field(default_factory=ProcessPolicy)
    scopes: Mapping[str, ScopePolicy] = field(default_factory=ScopeMap)
    source: str = CONFIGURE_SOURCE
    #: Fault injection in force from the start (the ``[inject]`` table), or ``None``.
    inject: InjectSettings | None = None

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or self.version != POLICY_VERSION:
            raise ValueError(f"Policy(): argument 'version': only version {POLICY_VERSION} is supported")
        if not isinstance(self.process, ProcessPolicy):
            raise TypeError(
                f"Policy(): argument 'process' must be a ProcessPolicy, not {type(self.process).__name__}"
            )
        if not isinstance(self.scopes, ScopeMap):
            object.__setattr__(self, "scopes", ScopeMap(self.scopes))
        if len(self.scopes) > MAX_SCOPES:
            raise ValueError(
                f"Policy(): argument 'scopes': at most {MAX_SCOPES} scopes, got {len(self.scopes)}"
            )
        for name, message in _module_conflicts(self.scopes.values()):
            raise ValueError(f"Policy(): argument 'scopes': scope {name!r}: modules: {message}")
        for name, message in _library_conflicts(self.scopes.values()):
            raise ValueError(f"Policy(): argument 'scopes': scope {name!r}: libraries: {message}")
        if self.inject is not None:
            if not isinstance(self.inject, InjectSettings):
                raise TypeError(
                    "Policy(): argument 'inject' must be an InjectSettings, "
                    f"not {type(self.inject).__name__}"
                )
            problem = _inject_scope_problem(self.inject.scope, self.scopes)
            if problem:
                raise ValueError(f"Policy(): argument 'inject': {problem}")

    def compile(self, *, proc_root: str = _PROC_ROOT, cgroup_root: str = _CGROUP_ROOT) -> str:
        """The flat table string the native library parses (``ap_configure``,
        ``ALLOCPOLICY_TABLE``)::

            v=1;grace=N;fd=N;process=MODE:N;scope=NAME:MODE:BUDGET:TOTAL;...

        Sizes are decimal bytes and 0 means no limit. Scopes come in declaration
        order. A percentage process budget is resolved here, against the memory
        available to this process now (``proc_root`` and ``cgroup_root`` exist
        for tests).

        Raises:
            PolicyError: a percentage budget cannot be resolved on this system.
        """
        p = self.process
        try:
            budget = resolve_process_budget(p.budget, proc_root=proc_root, cgroup_root=cgroup_root)
        except OSError as exc:
            raise PolicyError(
                [PolicyProblem(self.source, "process", "budget", f"cannot resolve {p.budget}: {exc}")]
            ) from None
        parts = [
            f"v={self.version}",
            f"grace={p.grace}",
            f"fd={p.report_fd}",
            f"process={p.on_oom}:{budget or 0}" + _overdraft_option(p.overdraft)
            + _raise_only_options(p.raise_only_from),
        ]
        margin = self._reserve_margin(proc_root, cgroup_root)
        if margin != DEFAULT_RESERVE_MARGIN:  # the native default; keeps tables short
            parts.insert(3, f"margin={margin}")
        for sc in self.scopes.values():
            entry = f"scope={sc.name}:{sc.on_oom}:{sc.budget or 0}:{sc.total_budget or 0}"
            entry += _overdraft_option(sc.overdraft)
            if sc.forbid:
                entry += f":forbid={sc.on_violation}:frees={int(sc.frees)}"
            entry += "".join(f":lib={pattern}" for pattern in sc.libraries)
            entry += _raise_only_options(sc.raise_only_from)
            parts.append(entry)
        if self.inject is not None:
            # Last: the injection may target a scope declared above.
            parts.append(self.inject.to_table())
        return ";".join(parts)

    def _reserve_margin(self, proc_root: str, cgroup_root: str) -> int:
        margin = self.process.reserve_margin
        if not isinstance(margin, Percent):
            return margin
        try:
            total, _ = memory_limit(proc_root=proc_root, cgroup_root=cgroup_root)
        except OSError as exc:
            raise PolicyError(
                [PolicyProblem(self.source, "process", "reserve_margin", f"cannot resolve {margin}: {exc}")]
            ) from None
        return min(margin.of(total), MAX_SIZE)

    def describe(self, *, proc_root: str = _PROC_ROOT, cgroup_root: str = _CGROUP_ROOT) -> str:
        """Every setting with its effective value, for ``allocpolicy check``."""
        p = self.process
        lines = [f"policy: {self.source}", f"version: {self.version}", "", "[process]"]
        if isinstance(p.budget, Percent):
            try:
                total, basis = memory_limit(proc_root=proc_root, cgroup_root=cgroup_root)
            except OSError as exc:
                budget = f"{p.budget} of the memory available (cannot resolve here: {exc})"
            else:
                budget = f"{p.budget} of {_bytes(total)} ({basis}) = {_bytes(p.budget.of(total))} here"
        else:
            budget = _limit(p.budget)
        rows = [
            ("on_oom", f"{p.on_oom}  ({_MODE_HELP[p.on_oom]})"),
            ("budget", budget),
            ("grace", f"{_bytes(p.grace)}  (may still be allocated per thread and instance after a refusal)"),
            ("report_fd", f"{p.report_fd}  (diagnostics are written here)"),
            ("overdraft", f"{p.overdraft}  (an allocation beyond a reservation: {_ACTION_HELP[p.overdraft]})"),
            ("raise_only_from", _raise_only_help(p.raise_only_from, "every caller")),
            (
                "reserve_margin",
                f"{p.reserve_margin if isinstance(p.reserve_margin, Percent) else _bytes(p.reserve_margin)}"
                "  (reservations leave this much of the machine free)",
            ),
        ]
        lines += _rows(rows)
        if not self.scopes:
            lines += ["", "no scopes declared"]
        for sc in self.scopes.values():
            lines += ["", f"[{_table_name('scopes', sc.name)}]"]
            lines += _rows(
                [
                    ("on_oom", f"{sc.on_oom}  ({_MODE_HELP[sc.on_oom]})"),
                    ("budget", _limit(sc.budget) + ("  per instance" if sc.budget else "")),
                    (
                        "total_budget",
                        _limit(sc.total_budget) + ("  over all live instances" if sc.total_budget else ""),
                    ),
                    ("overdraft", f"{sc.overdraft}  (an allocation beyond a reservation: {_ACTION_HELP[sc.overdraft]})"),
                ]
            )
            if sc.forbid:
                frees = " and every free" if sc.frees else ""
                lines += _rows(
                    [
                        ("forbid", f"true  (no allocation{frees} in this scope)"),
                        ("on_violation", f"{sc.on_violation}  ({_ACTION_HELP[sc.on_violation]})"),
                        ("frees", "true" if sc.frees else "false"),
                    ]
                )
            if sc.modules:
                patterns = ", ".join(f'"{m}"' for m in sc.modules)
                # Padded like the rows above, whose longest key is total_budget.
                lines.append(
                    f"  {'modules':<12} = [{patterns}]  (code of these modules, and what it calls, "
                    "runs in this scope)"
                )
            if sc.libraries:
                patterns = ", ".join(f'"{m}"' for m in sc.libraries)
                lines.append(
                    f"  {'libraries':<12} = [{patterns}]  (allocations these shared objects' code "
                    "makes run in an instance of this scope nested in the current one)"
                )
            if sc.raise_only_from is not None:
                lines.append(
                    f"  {'raise_only_from':<12} = {_raise_only_help(sc.raise_only_from, 'every caller')}"
                )
        if self.inject is not None:
            lines += ["", "[inject]"] + _rows(_inject_rows(self.inject))
        return "\n".join(lines)


def _inject_scope_problem(scope: str | None, scopes: Mapping[str, ScopePolicy]) -> str | None:
    if scope is None or scope == PROCESS_SCOPE or scope in scopes:
        return None
    declared = ", ".join(scopes) or "none"
    return (
        f"scope {scope!r} is not declared in this policy{_did_you_mean(scope, scopes)} "
        f"(declared scopes: {declared}; "
        "'process' stands for every allocation)"
    )


def _inject_rows(inj: InjectSettings) -> list[tuple[str, str]]:
    where = "every allocation" if inj.scope in (None, PROCESS_SCOPE) else (
        f"allocations made inside instances of scope {inj.scope!r}"
    )
    rows = [("numbers", where)]
    if inj.min_size is not None or inj.max_size is not None:
        low = _bytes(inj.min_size) if inj.min_size is not None else "any size"
        high = _bytes(inj.max_size) if inj.max_size is not None else "any size"
        rows.append(("sizes", f"{low} to {high}"))
    if inj.domains:
        rows.append(("domains", ", ".join(inj.domains)))
    if inj.nth is not None:
        rows.append(("nth", f"{inj.nth}  (fails allocation #{inj.nth})"))
    if inj.start is not None or inj.stop is not None:
        stop = f"#{inj.stop - 1}" if inj.stop is not None else "the end"
        rows.append(("window", f"fails #{inj.start or 1} to {stop}"))
    if inj.every is not None:
        rows.append(("every", f"{inj.every}  (fails every {inj.every}th)"))
    if inj.probability is not None:
        rows.append(("probability", f"{inj.probability!r} with seed {inj.seed}  (the same seed fails the same indices)"))
    if inj.persistent:
        rows.append(("persistent", "true  (every allocation after the first failure fails too)"))
    if not inj.fails_anything:
        rows.append(("triggers", "none: allocations are numbered, nothing fails"))
    rows.append(("setting", f"{inj}  (as ALLOCPOLICY_INJECT takes it)"))
    return rows


def _raise_only_options(patterns: tuple[str, ...] | None) -> str:
    if patterns is None:
        return ""
    full = list(NULL_CHECKING_DEFAULT) + [p for p in patterns if p not in NULL_CHECKING_DEFAULT]
    return "".join(f":raise_only={pattern}" for pattern in full)


def _raise_only_help(patterns: tuple[str, ...] | None, unset: str) -> str:
    if patterns is None:
        return f"not set  (in raise mode {unset} gets NULL)"
    listed = ", ".join(f'"{p}"' for p in patterns)
    defaults = ", ".join(f'"{p}"' for p in NULL_CHECKING_DEFAULT)
    return (
        f"[{listed}]  (in raise mode only these and {defaults} get NULL; "
        "allocations from other code abort)"
    )


def _overdraft_option(action: str) -> str:
    # "count" is the native default; leaving it out keeps tables short.
    return "" if action == "count" else f":overdraft={action}"


_ACTION_HELP = {
    "raise": "refuse the allocation: AllocError",
    "abort": "print a diagnostic and abort the process",
    "warn": "allow it, warn once at the end",
    "count": "allow it, count it in stats",
}

_MODE_HELP = {
    "raise": "a refused allocation raises AllocError at the nearest task boundary",
    "abort": "a refused allocation prints a diagnostic and aborts the process",
    "fallible": "ordinary allocations never fail for budget reasons; a real out-of-memory aborts",
}


def _bytes(n: int) -> str:
    return f"{n} bytes ({format_size(n)})"


def _limit(n: int | None) -> str:
    return "none (no limit)" if n is None else _bytes(n)


def _rows(rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(k) for k, _ in rows)
    return [f"  {k.ljust(width)} = {v}" for k, v in rows]


_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


def _table_name(*parts: str) -> str:
    """Dotted TOML table name, quoting the parts that need it (``scopes."a.b"``)."""
    out = []
    for part in parts:
        if _BARE_KEY_RE.fullmatch(part):
            out.append(part)
        else:
            escaped = part.replace("\\", "\\\\").replace('"', '\\"')
            out.append(f'"{escaped}"')
    return ".".join(out)


# --- Loading ---------------------------------------------------------------------


class _Collector:
    """Collects every problem of one load, so users fix them all in one go."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[PolicyProblem] = []

    def add(self, table: str, key: str | None, message: str) -> None:
        self.problems.append(PolicyProblem(self.source, table, key, message))

    def table(self, raw: Mapping[Any, Any], table: str, keys: Mapping[str, _Key]) -> dict[str, Any]:
        """Validate one table against its key table; returns the valid values."""
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if not isinstance(key, str):
                self.add(table, repr(key), f"keys must be strings, got {_kind(key)}")
                continue
            spec = keys.get(key)
            if spec is None:
                self.add(table, key, _unknown_key(key, keys))
                continue
            if value is None and spec.optional:
                # Only mappings can say this (TOML has no null): "not set".
                values[key] = None
                continue
            try:
                values[key] = spec.validate(value)
            except ValueError as exc:
                self.add(table, key, str(exc))
        return values


def _unknown_key(key: str, allowed: Iterable[str]) -> str:
    allowed = list(allowed)
    return f"unknown key {key!r}{_did_you_mean(key, allowed)}; allowed keys: {', '.join(allowed)}"


def _build(data: object, source: str, *, require_version: bool = True) -> Policy:
    out = _Collector(source)
    if not isinstance(data, Mapping):
        out.add("", None, f"expected a table of settings, got {_kind(data)}")
        raise PolicyError(out.problems)

    if "version" not in data:
        if require_version:
            out.add("", "version", f"missing; a policy starts with `version = {POLICY_VERSION}`")
    else:
        version = data["version"]
        if isinstance(version, bool) or not isinstance(version, int):
            out.add("", "version", f"expected the integer {POLICY_VERSION}, got {_kind(version)}")
        elif version != POLICY_VERSION:
            out.add(
                "",
                "version",
                f"unsupported version {version}; this allocpolicy reads version {POLICY_VERSION}",
            )

    # Top level: version, [process], [scopes.*]; anything else is a mistake.
    for key, value in data.items():
        if key in _TOP_KEYS:
            continue
        message = _unknown_key(str(key), _TOP_KEYS)
        if isinstance(value, Mapping) and "did you mean" not in message:
            message += f"; scopes are declared as [{_table_name('scopes', str(key))}]"
        out.add("", str(key), message)

    process_values: dict[str, Any] = {}
    raw_process = data.get("process", {})
    if isinstance(raw_process, Mapping):
        process_values = out.table(raw_process, "process", _PROCESS_KEYS)
    else:
        out.add("", "process", f"expected a table [process], got {_kind(raw_process)}")

    scopes: list[ScopePolicy] = []
    raw_scopes = data.get("scopes", {})
    if not isinstance(raw_scopes, Mapping):
        out.add("", "scopes", f"expected tables [scopes.NAME], got {_kind(raw_scopes)}")
        raw_scopes = {}
    if "include" in data:
        raw_scopes = _include(out, data["include"], raw_scopes)
    if len(raw_scopes) > MAX_SCOPES:
        out.add("scopes", None, f"at most {MAX_SCOPES} scopes can be declared, got {len(raw_scopes)}")
    for name, raw in raw_scopes.items():
        table = _table_name("scopes", str(name))
        name_problem = _scope_name_problem(name)
        if name_problem:
            out.add("scopes", str(name), name_problem)
        if not isinstance(raw, Mapping):
            out.add("scopes", str(name), f"expected a table [{table}], got {_kind(raw)}")
            continue
        values = out.table(raw, table, _SCOPE_KEYS)
        if not values.get("forbid"):
            for key in ("on_violation", "frees"):
                if key in raw:
                    out.add(table, key, "has no effect without `forbid = true` in the same table")
        if not name_problem:
            scopes.append(ScopePolicy(name, **values))
    for name, message in _module_conflicts(scopes):
        out.add(_table_name("scopes", name), "modules", message)
    for name, message in _library_conflicts(scopes):
        out.add(_table_name("scopes", name), "libraries", message)

    inject = None
    raw_inject = data.get("inject")
    if raw_inject is not None and not isinstance(raw_inject, Mapping):
        out.add("", "inject", f"expected a table [inject], got {_kind(raw_inject)}")
    elif raw_inject is not None:
        inject = _build_inject(out, raw_inject, {sc.name for sc in scopes} | set(raw_scopes))

    if out.problems:
        raise PolicyError(out.problems)
    return Policy(
        version=POLICY_VERSION,
        process=ProcessPolicy(**process_values),
        scopes=ScopeMap(scopes),
        source=source,
        inject=inject,
    )


def _include(out: _Collector, names: object, raw_scopes: Mapping[Any, Any]) -> Mapping[Any, Any]:
    """``raw_scopes`` with the scopes of the fragments ``include`` names
    (see _offenders.py), after the policy's own."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        out.add("", "include", f"expected an array of fragment names, got {_kind(names)}")
        return raw_scopes
    merged = dict(raw_scopes)
    for name in names:
        try:
            tables = _offenders.fragment(name)
        except KeyError:
            known = ", ".join(f'"{n}"' for n in _offenders.FRAGMENTS)
            out.add("", "include", f"unknown fragment {name!r}{_did_you_mean(name, _offenders.FRAGMENTS)}; "
                    f"the fragments are: {known}")
            continue
        for scope, table in tables.items():
            if scope in merged:
                out.add("", "include", f"fragment {name!r} declares the scope {scope!r}, which is declared "
                        f"already; drop one of them")
                continue
            merged[scope] = table
    return merged


def _build_inject(out: _Collector, raw: Mapping[Any, Any], declared: set) -> InjectSettings | None:
    before = len(out.problems)
    values = {k: v for k, v in out.table(raw, "inject", _INJECT_KEYS).items() if v is not None}
    wrong = check_combination(values)
    if wrong:
        out.add("inject", wrong[0], wrong[1])
    scope = values.get("scope")
    if scope is not None and scope != PROCESS_SCOPE and scope not in declared:
        out.add("inject", "scope", _inject_scope_problem(scope, dict.fromkeys(sorted(declared))) or "")
    if len(out.problems) > before:
        return None
    if "probability" in values and "seed" not in values:
        # A file is read again by every process that needs the policy: a
        # seed drawn at random here would differ between them, so the file's
        # default is fixed (ALLOCPOLICY_INJECT draws one per run instead).
        values["seed"] = 0
    return InjectSettings(**values)


def policy_from_mapping(
    data: Mapping[str, Any], source: str = CONFIGURE_SOURCE, *, require_version: bool = True
) -> Policy:
    """Build a policy from a mapping shaped like the TOML file.

    ``{"version": 1, "scopes": {"request": {"budget": "256 MiB"}}}``. Same keys and
    checks as :func:`load_policy`; with ``require_version=False`` a missing
    ``version`` is taken as the current one.

    Raises:
        PolicyError: listing every mistake, with ``source`` as the location.
    """
    return _build(data, source, require_version=require_version)


_TOML_ERROR_RE = re.compile(r"^(?P<message>.*?)\s*\(at line (?P<line>\d+), column (?P<column>\d+)\)$", re.S)
_TABLE_HEADER_RE = re.compile(r"^\s*\[\[?\s*(?P<name>[^\]#]*?)\s*\]\]?\s*(?:#.*)?$")


def _syntax_problem(source: str, text: str, exc: tomllib.TOMLDecodeError) -> PolicyProblem:
    raw = str(exc)
    match = _TOML_ERROR_RE.match(raw)
    if not match:
        return PolicyProblem(source, "", None, f"TOML syntax error: {raw}")
    line, column = int(match["line"]), int(match["column"])
    lines = text.splitlines()
    # Name the table the error sits in (best effort: the last header above it).
    table = ""
    for previous in lines[: line - 1]:
        header = _TABLE_HEADER_RE.match(previous)
        if header:
            table = header["name"]
    message = f"TOML syntax error at line {line}, column {column}: {match['message']}"
    if 0 < line <= len(lines) and lines[line - 1].strip():
        message += f": {lines[line - 1].strip()}"
    return PolicyProblem(source, table, None, message)


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read and validate a TOML policy file.

    Raises:
        PolicyError: listing every mistake (an unreadable file and TOML syntax
            errors are one problem each; otherwise one problem per wrong key).
    """
    return load_policy_text(path)[0]


def load_policy_text(path: str | os.PathLike[str]) -> tuple[Policy, str]:
    """:func:`load_policy`, and the text it was read from (which ``allocpolicy
    run`` hands on, so that the file is read once whatever it is)."""
    source = os.fspath(path)
    raw = _read_policy_file(source)
    return _load_text(raw, source), raw.decode("utf-8")


def _read_policy_file(source: str, *, regular_only: bool = False) -> bytes:
    """The bytes of a policy file, read once and at most :data:`MAX_POLICY_BYTES`.

    Any readable source works (a pipe read by ``allocpolicy run``);
    ``regular_only`` refuses anything but a regular file without blocking on
    it, for sources that every process under the runtime would read again.
    """

    def problem(message: str) -> PolicyError:
        return PolicyError([PolicyProblem(source, "", None, message)])

    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_NONBLOCK if regular_only else 0)
    try:
        fd = os.open(source, flags)
    except OSError as exc:
        raise problem(f"cannot read the policy file: {exc.strerror or exc}") from None
    try:
        if regular_only and not stat.S_ISREG(os.fstat(fd).st_mode):
            raise problem(
                f"not a regular file ({_file_kind(os.fstat(fd).st_mode)}), so it was not read: "
                f"every process started with {ENV_POLICY} in its environment would read it again; "
                "name a policy file, or start the program with `allocpolicy run --policy SOURCE`, "
                "which reads any source once and hands the policy on"
            )
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            total += len(chunk)
            if total > MAX_POLICY_BYTES:
                raise problem(f"the policy file is larger than {format_size(MAX_POLICY_BYTES)}")
            chunks.append(chunk)
    except OSError as exc:
        raise problem(f"cannot read the policy file: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISFIFO, "a pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a file"


def _load_text(raw: bytes, source: str) -> Policy:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(
            [PolicyProblem(source, "", None, f"the policy file is not UTF-8 text (byte {exc.start})")]
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError([_syntax_problem(source, text, exc)]) from None
    return _build(data, source)


@functools.cache
def default_policy() -> Policy:
    """The built-in policy, from ``default_policy.toml`` shipped in the package."""
    raw = importlib.resources.files(__package__).joinpath("default_policy.toml").read_bytes()
    return _load_text(raw, BUILTIN_SOURCE)


def policy_from_environment(environ: Mapping[str, str] | None = None) -> Policy | None:
    """The policy handed to this process through the environment, if any.

    :data:`ENV_POLICY_TOML` (set by ``allocpolicy run``) is the policy's text,
    and :data:`ENV_POLICY` names its source; without the text,
    :data:`BUILTIN_SOURCE` gives :func:`default_policy` and a path gives that
    file loaded, if it is a regular file. ``None`` when neither is set.

    Raises:
        PolicyError: the policy does not load; the file named is missing, not
            a regular file, or not a valid policy.
    """
    env = os.environ if environ is None else environ
    where = env.get(ENV_POLICY)
    text = env.get(ENV_POLICY_TOML)
    if text is not None:
        return _load_text(text.encode("utf-8", "surrogateescape"), where or ENV_POLICY_TOML)
    if not where:
        return None
    if where == BUILTIN_SOURCE:
        return default_policy()
    return _load_text(_read_policy_file(where, regular_only=True), where)


# --- Percent budgets -------------------------------------------------------------


def resolve_process_budget(
    budget: int | Percent | None, *, proc_root: str = _PROC_ROOT, cgroup_root: str = _CGROUP_ROOT
) -> int | None:
    """Bytes for a process budget: a :class:`Percent` is taken of :func:`memory_limit`.

    Raises:
        OSError: a percentage cannot be resolved on this system.
    """
    if budget is None or isinstance(budget, int):
        return budget
    if isinstance(budget, Percent):
        total, _ = memory_limit(proc_root=proc_root, cgroup_root=cgroup_root)
        return min(budget.of(total), MAX_SIZE)
    raise TypeError(f"budget must be an int, a Percent or None, not {type(budget).__name__}")


