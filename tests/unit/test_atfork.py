"""The package's locks are free again in a forked child."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import allocpolicy
from allocpolicy import _atfork

PACKAGE = Path(allocpolicy.__file__).resolve().parent


@pytest.mark.parametrize("make", [_atfork.lock, _atfork.rlock])
def test_a_lock_held_at_fork_is_free_in_the_child(make):
    held = make()
    held.acquire()  # as by a thread inside configure() when another forks
    try:
        pid = os.fork()
        if pid == 0:
            os._exit(0 if held.acquire(blocking=False) else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        held.release()
    assert os.waitstatus_to_exitcode(status) == 0


def test_every_lock_of_the_package_is_made_fork_safe():
    # A lock made any other way would be copied held into a forked child.
    pattern = re.compile(r"allocate_lock\(|\bLock\(|\bRLock\(|Condition\(|Semaphore\(")
    found = [
        f"{path.name}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "_atfork.py"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, "locks not made by allocpolicy._atfork:\n" + "\n".join(found)
