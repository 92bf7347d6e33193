"""Libraries known not to check for NULL, and the policy fragments that keep
a refusal away from them.

A refused allocation in ``raise`` mode returns NULL to the code that asked.
Most libraries report that to their caller (CPython raises ``MemoryError``);
some end the process instead: OpenBLAS calls ``exit(1)`` when its allocator
fails. The one table below says which they are, with the file-name patterns
of their shared objects. A policy covers an offender with

    include = ["openblas"]

which adds the offender's fragment: a library scope in ``fallible`` mode
bound to those patterns, so that the library's allocations are counted but
never refused for budget reasons (a real out-of-memory still aborts with the
diagnostic). ``allocpolicy check`` warns about offenders present in the
environment that the policy does not cover; under ``allocpolicy libs`` (or
``run --libs-report``) each Python process warns, before its report, about
offenders it loaded whose allocations a budget could refuse.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

__all__ = ["KNOWN_OFFENDERS", "Offender", "fragment", "uncovered", "found_in_environment", "warn_loaded"]


class Offender(NamedTuple):
    name: str  #: what users call it
    fragment: str  #: the name ``include`` takes, and the scope it declares
    patterns: tuple[str, ...]  #: file names of its shared objects (globs)
    on_null: str  #: what it does when an allocation fails


#: The one table of libraries known not to check for NULL.
KNOWN_OFFENDERS: tuple[Offender, ...] = (
    Offender(
        "OpenBLAS",
        "openblas",
        # Distribution builds, and the builds NumPy and SciPy wheels bundle.
        ("libopenblas*.so*", "libscipy_openblas*.so*"),
        "calls exit(1) when an allocation fails",
    ),
)

FRAGMENTS: dict[str, Offender] = {o.fragment: o for o in KNOWN_OFFENDERS}


def fragment(name: str) -> dict[str, Any]:
    """The ``[scopes.*]`` tables that ``include = [name]`` adds, as parsed TOML.

    Raises:
        KeyError: no fragment of that name.
    """
    o = FRAGMENTS[name]
    return {o.fragment: {"on_oom": "fallible", "libraries": list(o.patterns)}}


def _covered(o: Offender, scopes: Iterable[Any]) -> bool:
    """Some scope that does not raise governs every pattern of ``o``."""
    for pattern in o.patterns:
        if not any(
            sc.on_oom != "raise" and any(_overlap(pattern, bound) for bound in sc.libraries) for sc in scopes
        ):
            return False
    return True


def _overlap(pattern: str, bound: str) -> bool:
    return pattern == bound or fnmatch.fnmatchcase(pattern.replace("*", "x"), bound)


def uncovered(scopes: Mapping[str, Any]) -> list[Offender]:
    """The known offenders that a policy's scopes do not keep refusals from."""
    return [o for o in KNOWN_OFFENDERS if not _covered(o, scopes.values())]


def _library_dirs() -> list[str]:
    dirs = []
    for entry in sys.path:
        # Wheels bundle their shared objects in <package>.libs next to the package.
        dirs += glob.glob(os.path.join(entry, "*.libs"))
    dirs += glob.glob("/usr/lib/*-linux-gnu") + glob.glob("/usr/lib/*-linux-gnu/openblas*") + ["/usr/lib", "/usr/lib64"]
    return dirs


def found_in_environment(offenders: Iterable[Offender]) -> list[tuple[Offender, str]]:
    """``(offender, path)`` for each offender whose shared object this Python
    environment or the system library directories hold (first match each)."""
    found = []
    dirs = _library_dirs()
    for o in offenders:
        hit = next(
            (p for d in dirs for pattern in o.patterns for p in sorted(glob.glob(os.path.join(d, pattern)))), None
        )
        if hit is not None:
            found.append((o, hit))
    return found


def advice(o: Offender, where: str) -> str:
    return (
        f"warning: {o.name} ({where}) {o.on_null}: a budget that refuses one of its allocations "
        f"ends the process instead of raising AllocError; add include = [\"{o.fragment}\"] to the "
        "policy (a fallible library scope for it)"
    )


def warn_loaded(rt, scope_modes: Mapping[int, str], fd: int) -> None:
    """Write :func:`advice` to ``fd`` for each offender that allocated in this
    process outside a scope that does not raise (from the libraries report's
    counters)."""
    lines = []
    for lib in rt.lib_stats():
        name = os.path.basename(lib.name.decode("utf-8", "replace"))
        if scope_modes.get(lib.scope, "raise") != "raise":
            continue
        for o in KNOWN_OFFENDERS:
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in o.patterns):
                lines.append(f"allocpolicy: {advice(o, name)}\n")
    if lines:
        os.write(fd, "".join(lines).encode())


def warn_at_exit(rt, table: str) -> None:
    """Under the libraries report (``libreport=FD`` in the table): run
    :func:`warn_loaded` when the interpreter exits, on the report's descriptor."""
    import atexit

    fd_text = table.rsplit(";libreport=", 1)[1].split(";", 1)[0]
    if not fd_text.isdigit():
        return  # "off"

    def warn() -> None:
        proc = rt.process_stats()
        modes = {}
        for sid in range(1, proc.scopes):
            s = rt.scope_stats(sid)
            if s is not None:
                modes[sid] = ("raise", "abort", "fallible")[s.mode] if s.mode < 3 else "raise"
        try:
            warn_loaded(rt, modes, int(fd_text))
        except OSError:
            pass  # the descriptor is gone: the report is lost too

    atexit.register(warn)
