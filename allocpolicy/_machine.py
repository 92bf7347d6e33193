"""How much memory the machine gives this process: the one reading of the
cgroup limits and of ``/proc/meminfo``.

Two questions are asked of it. A percentage budget (``budget = "80%"``) is a
share of the *limit*: the lowest cgroup memory limit of the process's cgroup
and its ancestors, or physical memory (``MemTotal``) where that is lower. A
reservation is granted only within the *headroom*: the least room under any
of those limits (limit minus usage), or ``MemAvailable`` where that is lower.

The cgroups are found as the kernel shows them in ``/proc/self/cgroup``:

- cgroup v2 (``0::/path``): the unified hierarchy is mounted at
  ``/sys/fs/cgroup``, or at ``/sys/fs/cgroup/unified`` on a hybrid system
  (v1 controllers beside it); ``memory.max`` and ``memory.current``;
- cgroup v1 (``N:...memory...:/path``): the memory controller's hierarchy at
  ``/sys/fs/cgroup/memory``; ``memory.limit_in_bytes`` and
  ``memory.usage_in_bytes``, where a value from 2**62 up means no limit.

Each level from the process's own cgroup up to the mount counts, since any of
them can be the one that stops us; levels the mount does not have (a
container that sees the host's path without a cgroup namespace) are skipped,
so the mount's own directory stands for the container's cgroup.

The runtime reads the same files the same way for reservations
(``native/src/machine.c``, without the heap); ``tests/data/machine`` holds the
trees both readings are tested on. ``ALLOCPOLICY_MACHINE_ROOT`` names a
directory that stands for ``/`` in both readings, for those tests.
"""

from __future__ import annotations

__all__ = ["machine_headroom", "memory_limit"]

import os
from collections.abc import Iterator

PROC_ROOT = "/proc"
CGROUP_ROOT = "/sys/fs/cgroup"
# cgroup v1 reports "no limit" as a page-rounded INT64_MAX.
V1_UNLIMITED = 1 << 62
#: machine_headroom() when nothing can be read: large enough never to refuse.
UNKNOWN_HEADROOM = 1 << 62
ENV_ROOT = "ALLOCPOLICY_MACHINE_ROOT"

# (mount under the cgroup root, limit file, usage file)
_V2 = ("memory.max", "memory.current")
_V1 = ("memory.limit_in_bytes", "memory.usage_in_bytes")


def _read(path: str) -> str | None:
    path = os.environ.get(ENV_ROOT, "") + path
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError:
        return None


def _number(text: str | None) -> int | None:
    value = (text or "").strip()
    return int(value) if value.isdigit() else None  # "max", garbage or nothing


def _hierarchies(proc_root: str, cgroup_root: str) -> Iterator[tuple[str, str, tuple[str, str]]]:
    """(mount, path of our cgroup in it, files) for each hierarchy with memory limits."""
    text = _read(f"{proc_root}/self/cgroup")
    for line in (text or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            unified = f"{cgroup_root}/unified"
            hybrid = os.path.isdir(os.environ.get(ENV_ROOT, "") + unified)
            yield (unified if hybrid else cgroup_root), path, _V2
        elif "memory" in controllers.split(","):
            yield f"{cgroup_root}/memory", path, _V1


def _levels(proc_root: str, cgroup_root: str) -> Iterator[tuple[int, str, str]]:
    """(limit, directory, files) of every level that sets a memory limit."""
    for mount, path, files in _hierarchies(proc_root, cgroup_root):
        parts = [p for p in path.split("/") if p not in ("", ".", "..")]
        for depth in range(len(parts), -1, -1):
            directory = "/".join([mount, *parts[:depth]])
            limit = _number(_read(f"{directory}/{files[0]}"))
            if limit is not None and limit < V1_UNLIMITED:
                yield limit, directory, files


def _meminfo(proc_root: str, key: str) -> int | None:
    for line in (_read(f"{proc_root}/meminfo") or "").splitlines():
        name, _, rest = line.partition(":")
        if name == key:
            fields = rest.split()
            if fields and fields[0].isdigit():
                return int(fields[0]) * 1024
    return None


def memory_limit(*, proc_root: str = PROC_ROOT, cgroup_root: str = CGROUP_ROOT) -> tuple[int, str]:
    """Bytes of memory available to this process, and where that number came from:
    the lowest cgroup limit on the way up from the process's cgroup, or
    ``MemTotal`` where no cgroup sets a limit or physical memory is lower.

    Raises:
        OSError: neither a cgroup limit nor ``MemTotal`` could be read.
    """
    candidates = [(limit, f"cgroup limit in {d}/{files[0]}") for limit, d, files in _levels(proc_root, cgroup_root)]
    total = _meminfo(proc_root, "MemTotal")
    if total is not None:
        candidates.append((total, f"MemTotal in {proc_root}/meminfo"))
    if not candidates:
        raise OSError(
            f"cannot tell how much memory is available: no cgroup memory limit under {cgroup_root} "
            f"and no MemTotal in {proc_root}/meminfo"
        )
    return min(candidates, key=lambda c: c[0])


def machine_headroom(*, proc_root: str = PROC_ROOT, cgroup_root: str = CGROUP_ROOT) -> tuple[int, str]:
    """Bytes the machine can still give this process, and where that came from.

    The least room under a cgroup limit on the way up from the process's
    cgroup (the limit minus that cgroup's usage), or ``MemAvailable`` where
    that is lower; cgroup v1 and v2 alike. Returns a very large number with the
    source ``"unknown"`` when neither can be read. Reservations check this in
    the runtime itself, reading the same files the same way.
    """
    candidates = []
    for limit, directory, (limit_file, usage_file) in _levels(proc_root, cgroup_root):
        usage = _number(_read(f"{directory}/{usage_file}"))
        if usage is not None:
            candidates.append((max(limit - usage, 0), f"{directory}/{limit_file} minus {usage_file}"))
    available = _meminfo(proc_root, "MemAvailable")
    if available is not None:
        candidates.append((available, f"MemAvailable in {proc_root}/meminfo"))
    if not candidates:
        return (UNKNOWN_HEADROOM, "unknown")
    return min(candidates, key=lambda c: c[0])
