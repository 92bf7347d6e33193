"""Tasks of the task-runner tests: ordinary jobs and memory bombs, importable
by worker processes (spawn and forkserver import them by name)."""

from __future__ import annotations

import gc
import os

import numpy

import allocpolicy


def normal(i: int) -> tuple[int, int]:
    """A few MiB of real work; returns (worker pid, a checksum)."""
    rows = [{"i": j, "s": str(j * i)} for j in range(20_000)]
    block = numpy.arange(100_000, dtype=numpy.int64) * i
    return os.getpid(), sum(len(r["s"]) for r in rows) + int(block[-1])


def add(a: int, b: int) -> int:
    return a + b


def bomb_bytes(i: int) -> bytes:
    return b"x" * (10**10 + i)


def bomb_numpy(i: int):
    return numpy.ones((100_000, 100_000 + i))


def bomb_grow(i: int):
    rows = []
    while True:
        rows.append(bytearray(8 << 20))


BOMBS = [bomb_bytes, bomb_numpy, bomb_grow]


def needs_mib(mib: int) -> int:
    """Holds ``mib`` MiB at once: over a 64 MiB budget, within twice that."""
    return len(bytearray(mib << 20)) >> 20


def scope_live(scope: str = "task") -> tuple[int, int, int]:
    """(pid, live bytes of ``scope``, pymalloc arenas charged to scopes) in
    the process that runs it, once cyclic garbage is gone."""
    gc.collect()
    s = allocpolicy.stats()
    return os.getpid(), s.scopes[scope].live, s.process.arenas_live
