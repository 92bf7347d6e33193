"""Facts the documentation states in prose, checked against the code, so that
a page cannot go stale silently."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import allocpolicy
from allocpolicy import _errors, _native

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def quickstart_alloc_error_table() -> dict[str, str]:
    """The attribute table of the quickstart's "Catch AllocError": name -> text."""
    text = (DOCS / "quickstart.rst").read_text(encoding="utf-8")
    section = text.split("Catch AllocError\n----------------\n", 1)[1]
    table = re.search(r"^(=+  =+)\n(.*?)\n\1\n", section, re.S | re.M)
    assert table, "the quickstart has no attribute table under 'Catch AllocError'"
    rows: dict[str, str] = {}
    name = None
    for line in table.group(2).splitlines():
        match = re.match(r"``(\w+)``\s+(.*)", line)
        if match:
            name = match.group(1)
            rows[name] = match.group(2)
        else:
            assert name is not None, line
            rows[name] += " " + line.strip()
    return rows


def test_the_quickstart_lists_every_attribute_reason_and_limit_of_alloc_error():
    rows = quickstart_alloc_error_table()
    params = inspect.signature(allocpolicy.AllocError.__init__).parameters
    assert set(rows) == {name for name in params if name != "self"}
    for reason in _errors.REASONS:
        assert f'``"{reason}"``' in rows["reason"], reason
    assert "reserved" not in rows["reason"]
    for limit in filter(None, _native.LIMITS):
        assert f'``"{limit}"``' in rows["limit"], limit


def test_allocpolicy_library_naming_no_file_is_an_error_not_a_fallback(tmp_path):
    # docs/policy.rst: "If it names no file, that is an error ... exit with status 1".
    missing = tmp_path / "no-such-library.so"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOCPOLICY_")}
    env["ALLOCPOLICY_LIBRARY"] = str(missing)
    for args in (["lib"], ["run", "--", sys.executable, "-c", "pass"]):
        proc = subprocess.run(
            [sys.executable, "-m", "allocpolicy", *args], env=env, cwd=ROOT,
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 1, (args, proc)
        assert f"ALLOCPOLICY_LIBRARY names '{missing}', which is not a file" in proc.stderr
